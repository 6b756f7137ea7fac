"""The `ipvs-fleet` command line: one subcommand per capability.

Each capability module exposes `add_parser(subparsers)`, which registers its subcommand
and sets `func(args) -> int` as the default. Errors of type FleetError become one clear
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ipvs_fleet.errors import FleetError

# Modules that register a subcommand, in the order `--help` lists them.
SUBCOMMANDS = [
    "ipvs_fleet.lab.cli",
    "ipvs_fleet.build.cli",
    "ipvs_fleet.pins",
    "ipvs_fleet.probe.cli",
    "ipvs_fleet.compliance.cli",
    "ipvs_fleet.rollout.cli",
    "ipvs_fleet.demo",
]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipvs-fleet",
        description="Roll the conn_reuse_old_conntrack IPVS fix out to a fleet, safely.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # capability not built yet
        mod.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        rc: int = args.func(args)
    except FleetError as e:
        print(f"ipvs-fleet: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ipvs-fleet: interrupted", file=sys.stderr)
        return 130
    return rc


if __name__ == "__main__":
    sys.exit(main())
