"""Option spellings every subcommand shares: `--dry` for a dry run (pyinfra's spelling) and
`--json PATH` for JSON output (the spelling of check and rollout). An older spelling stays
accepted as a hidden alias that prints a one-line note, so scripts that use it keep working.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DRY = "--dry"
JSON = "--json"


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling: does what `new` does, after a note on stderr."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, *, new: str, **kwargs: Any
    ) -> None:
        kwargs.update(help=argparse.SUPPRESS, default=argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(
            f"{parser.prog}: note: {option_string} is deprecated, use {self.new}", file=sys.stderr
        )
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def add_alias(p: argparse.ArgumentParser, *old: str, new: str, dest: str, **kwargs: Any) -> None:
    """Accept `old` spellings of option `new` (same dest), hidden from --help."""
    p.add_argument(*old, dest=dest, action=DeprecatedAlias, new=new, **kwargs)


def add_dry(p: argparse.ArgumentParser, help: str, old: Sequence[str] = ()) -> None:
    """`--dry` (dest `dry`), and its old spellings as deprecated aliases."""
    p.add_argument(DRY, action="store_true", help=help)
    if old:
        add_alias(p, *old, new=DRY, dest="dry", nargs=0, const=True)


def add_json(
    p: argparse.ArgumentParser, help: str, dest: str = "json", old: Sequence[str] = ()
) -> None:
    """`--json PATH`, and its old spellings as deprecated aliases."""
    p.add_argument(JSON, type=Path, dest=dest, metavar="PATH", help=help)
    if old:
        add_alias(p, *old, new=JSON, dest=dest, type=Path, metavar="PATH")
