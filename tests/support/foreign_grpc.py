"""grpcio's own health-checking and reflection clients, run in a process of their own.

    python -m tests.support.foreign_grpc check HOST:PORT SERVICE
    python -m tests.support.foreign_grpc watch HOST:PORT SERVICE     (one status per line,
                                                              then how the call ended)
    python -m tests.support.foreign_grpc describe HOST:PORT SERVICE [MESSAGE]
    python -m tests.support.foreign_grpc method HOST:PORT SERVICE.METHOD
    python -m tests.support.foreign_grpc files HOST:PORT SYMBOL     (the files of one answer)

With FOREIGN_GRPC_CA set (a PEM file of the CAs it trusts), they connect over TLS,
checking the server's certificate for FOREIGN_GRPC_NAME.

They are the clients a load balancer or grpcurl-like tool uses. A process of
their own, because their generated modules register the same protobuf symbols
(grpc.health.v1, grpc.reflection) as grpclib's, which the service's modules
import: both cannot live in one descriptor pool.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc

from tests.support.service import ROOT


def _channel(address: str) -> grpc.Channel:
    trusted = os.environ.get("FOREIGN_GRPC_CA")
    if trusted is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(root_certificates=Path(trusted).read_bytes())
    name = os.environ["FOREIGN_GRPC_NAME"]
    return grpc.secure_channel(
        address, credentials, options=[("grpc.ssl_target_name_override", name)]
    )


def check(address: str, service: str) -> dict[str, object]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        except grpc.RpcError as error:
            return {"code": error.code().name}
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return {"code": "OK", "status": status}


def watch(address: str, service: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            for reply in stub.Watch(health_pb2.HealthCheckRequest(service=service), timeout=60):
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                print(name, flush=True)
        except grpc.RpcError as error:
            print(f"ended {error.code().name}: {error.details()}", flush=True)


def describe(address: str, service: str, message: str | None) -> dict[str, object]:
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with _channel(address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = DescriptorPool(database)
        described: dict[str, object] = {
            "services": sorted(database.get_services()),
            "methods": sorted(m.name for m in pool.FindServiceByName(service).methods),
        }
        if message:
            described["fields"] = [f.name for f in pool.FindMessageTypeByName(message).fields]
        return described


def method(address: str, full_name: str) -> dict[str, object]:
    """A method looked up by its full name first, as grpcurl's `describe` does: the
    server is asked for the file containing that symbol."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with _channel(address) as channel:
        pool = DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        try:
            found = pool.FindMethodByName(full_name)
        except KeyError:
            return {"found": False}
        return {
            "found": True,
            "input": found.input_type.full_name,
            "output": found.output_type.full_name,
        }


def files(address: str, symbol: str) -> dict[str, object]:
    """The names of the files one reflection request for the file containing `symbol`
    is answered with, in their order."""
    from google.protobuf.descriptor_pb2 import FileDescriptorProto
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with _channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)
        (answer,) = stub.ServerReflectionInfo(iter([request]))
    return {
        "files": [
            FileDescriptorProto.FromString(serialized).name
            for serialized in answer.file_descriptor_response.file_descriptor_proto
        ]
    }


def main(argv: Sequence[str]) -> None:
    verb, address, service, *rest = argv
    if verb == "watch":
        watch(address, service)
    elif verb == "check":
        print(json.dumps(check(address, service)))
    elif verb == "method":
        print(json.dumps(method(address, service)))
    elif verb == "files":
        print(json.dumps(files(address, service)))
    else:
        print(json.dumps(describe(address, service, rest[0] if rest else None)))


async def run(
    *args: str, within: float = 30.0, env: Mapping[str, str] | None = None
) -> dict[str, object]:
    """One `check` or `describe`, from a test: its JSON answer. `env`: added to this
    process's environment."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.support.foreign_grpc",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), within)
    if process.returncode != 0:
        raise AssertionError(f"foreign_grpc {' '.join(args)} failed:\n{stderr.decode()}")
    answer: dict[str, object] = json.loads(stdout)
    return answer


if __name__ == "__main__":
    main(sys.argv[1:])
