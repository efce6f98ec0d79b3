"""Event-sourced, CQRS invoice financing on asyncio, PostgreSQL and RabbitMQ."""

from importlib import metadata


def release() -> str:
    """This release's version, as installed ("unknown" in a source tree never installed)."""
    try:
        return metadata.version("financing")
    except metadata.PackageNotFoundError:
        return "unknown"
