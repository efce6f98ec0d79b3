"""Event-sourced, CQRS invoice financing on asyncio, PostgreSQL and RabbitMQ."""
