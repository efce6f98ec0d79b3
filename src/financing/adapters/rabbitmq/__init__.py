"""RabbitMQ adapter: connection, watermill-compatible topology, envelopes, publishing, consuming."""

from financing.adapters.rabbitmq import frames

# Before any frame is decoded: a content header pamqp cannot decode would close the
# connection, again at every redelivery (see `frames`).
frames.install()
