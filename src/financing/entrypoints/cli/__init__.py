"""The `financing` command line: `main` parses it; one module per command that inspects or
repairs a deployment."""

from financing.entrypoints.cli.main import main

__all__ = ["main"]
