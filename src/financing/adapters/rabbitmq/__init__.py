"""RabbitMQ adapter: connection, watermill-compatible topology, envelopes, publishing, consuming."""
