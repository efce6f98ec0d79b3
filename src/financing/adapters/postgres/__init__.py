"""PostgreSQL adapters: the event store with its outbox, and the read models."""
