"""Rich consoles for ipvs-fleet's own output that do not wrap in CI logs.

Off a terminal rich wraps at 80 columns, splitting a step such as "Write
/etc/modules-load.d/..." over two lines of a CI log. There a console is $COLUMNS (else WIDE)
columns wide and soft-wraps: a line stays one line, however long.
"""

from __future__ import annotations

import os
import sys

from rich.console import Console

WIDE = 200  # rules and tables off a terminal, without $COLUMNS


def console(stderr: bool = False) -> Console:
    """A terminal's own width on a terminal; elsewhere wide, lines never wrapped."""
    stream = sys.stderr if stderr else sys.stdout
    if stream.isatty():
        return Console(stderr=stderr, highlight=False)
    cols = os.environ.get("COLUMNS", "")
    width = int(cols) if cols.isdigit() and int(cols) > 0 else WIDE
    return Console(stderr=stderr, highlight=False, width=width, soft_wrap=True)
