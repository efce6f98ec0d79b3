"""Event-sourced, CQRS invoice financing on asyncio, PostgreSQL and RabbitMQ.

Importing the package imports nothing else: the command line begins with it, and stops
cleanly on a signal only once its first line runs (`entrypoints.cli.main`); importing
`importlib.metadata` here took 50 ms of that, during which a SIGTERM killed the process
without a word.
"""

# This release's version: the package's metadata is made from it (pyproject.toml), and
# the code that runs says it, whatever metadata is installed beside it (a source tree
# put on PYTHONPATH over another release's install said that release's version).
__version__ = "0.6.15"


def release() -> str:
    """This release's version, as the running code says it."""
    return __version__
