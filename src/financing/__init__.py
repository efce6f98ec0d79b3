"""Event-sourced, CQRS invoice financing on asyncio, PostgreSQL and RabbitMQ.

Importing the package imports nothing else: the command line begins with it, and stops
cleanly on a signal only once its first line runs (`entrypoints.cli.main`); importing
`importlib.metadata` here took 50 ms of that, during which a SIGTERM killed the process
without a word.
"""


def release() -> str:
    """This release's version, as installed ("unknown" in a source tree never installed)."""
    from importlib import metadata

    try:
        return metadata.version("financing")
    except metadata.PackageNotFoundError:
        return "unknown"
