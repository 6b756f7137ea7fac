"""The `ipvs-fleet` command line: one subcommand per capability.

Each capability module exposes `add_parser(subparsers)`, which registers its subcommand
and sets `func(args) -> int` as the default. Errors of type FleetError become one clear
message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ipvs_fleet.errors import FleetError
from ipvs_fleet.resources import POLICY_ENV

# Modules that register a subcommand, in the order `--help` lists them.
SUBCOMMANDS = [
    "ipvs_fleet.lab.cli",
    "ipvs_fleet.build.cli",
    "ipvs_fleet.pins",
    "ipvs_fleet.probe.cli",
    "ipvs_fleet.compliance.cli",
    "ipvs_fleet.rollout.cli",
    "ipvs_fleet.demo",
    "ipvs_fleet.userrepo",
    "ipvs_fleet.kernel.upstream_series",
]
POLICY_HELP = (
    "host-class policy: a host_classes.yml or a directory holding it (and rollout.yml); "
    f"default ${POLICY_ENV}, else the packaged role's"
)


def package_version() -> str:
    """The installed distribution's version (its metadata, not the source tree)."""
    try:
        return version("ipvs-fleet")
    except PackageNotFoundError:
        return "unknown (not installed)"


def add_policy_option(p: argparse.ArgumentParser) -> None:
    """`--policy` after the subcommand too, unless the subcommand has its own."""
    # A subcommand with its own --policy (`check`) fills the same dest.
    with contextlib.suppress(argparse.ArgumentError):
        p.add_argument("--policy", type=Path, metavar="PATH", help=POLICY_HELP)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ipvs-fleet",
        description="Roll the conn_reuse_old_conntrack IPVS fix out to a fleet, safely.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    # Its own dest: a subcommand's --policy default (None) would overwrite it.
    p.add_argument("--policy", dest="global_policy", type=Path, metavar="PATH", help=POLICY_HELP)
    sub = p.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # capability not built yet
        mod.add_parser(sub)
    for subparser in sub.choices.values():
        add_policy_option(subparser)
    return p


def use_policy(args: argparse.Namespace, environ: MutableMapping[str, str] = os.environ) -> None:
    """Export the chosen policy, so that pyinfra and pytest children read the same one."""
    chosen = getattr(args, "policy", None) or args.global_policy
    if chosen:
        environ[POLICY_ENV] = str(Path(chosen).absolute())


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    use_policy(args)
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
