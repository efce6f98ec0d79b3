# One image for the whole service: `financing serve` runs every component.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --upgrade pip \
 && pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 financing
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER financing
WORKDIR /home/financing
ENV COMMAND_SERVER_ADDRESS=0.0.0.0:8080 \
    QUERY_SERVER_ADDRESS=0.0.0.0:8081 \
    PYTHONUNBUFFERED=1
EXPOSE 8080 8081
# Ready when both gRPC ports accept connections.
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=12 \
  CMD python -c "import socket; [socket.create_connection(('127.0.0.1', p), 2).close() for p in (8080, 8081)]"
ENTRYPOINT ["financing"]
CMD ["serve"]
