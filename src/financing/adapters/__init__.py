"""Adapters: the application's ports implemented on PostgreSQL and RabbitMQ."""
