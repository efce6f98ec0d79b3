"""The `financing` command line: `commands` parses it; one module per command that inspects
or repairs a deployment."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from financing.entrypoints.bootstrap import Overrides


def main(argv: Sequence[str] | None = None, *, overrides: Overrides | None = None) -> None:
    """Run `financing ARGS`. Every command's module is imported only now, so that importing
    one of them (the container's health probe) stays light."""
    from financing.entrypoints.cli.commands import run

    run(argv, overrides=overrides)


__all__ = ["main"]
