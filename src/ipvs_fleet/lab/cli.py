"""`ipvs-fleet lab up [HOST...] | down | status | prune | ssh HOST -- CMD`."""

from __future__ import annotations

import argparse
import os
import subprocess
from pathlib import Path
from typing import Any

from ipvs_fleet.cliopts import add_dry
from ipvs_fleet.debian import STRICT_PINS_ENV
from ipvs_fleet.errors import FleetError
from ipvs_fleet.lab.lab import Lab


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "lab",
        help="the embedded lab fleet of QEMU VMs",
        description="Boot, inspect and stop the lab fleet (lab/fleet.yml). The lab dir is "
        "$IPVS_FLEET_LAB_DIR or <repo>/.lab; images are cached in $IPVS_FLEET_CACHE.",
    )
    p.add_argument("--lab-dir", type=Path, help="lab dir (default: $IPVS_FLEET_LAB_DIR or .lab)")
    p.add_argument("--fleet", type=Path, help="fleet file (default: lab/fleet.yml)")
    sub = p.add_subparsers(dest="lab_command", required=True)
    up = sub.add_parser("up", help="boot the fleet (or the named hosts); no-op when up")
    up.add_argument("hosts", nargs="*", metavar="HOST")
    up.add_argument(
        "--strict-pins",
        action="store_true",
        help="fail if a locked kernel pin is gone from the Debian archive (default: warn and "
        f"image the newest kernel of the release; also ${STRICT_PINS_ENV}=1)",
    )
    up.set_defaults(func=_up)
    down = sub.add_parser("down", help="stop the VMs this lab started")
    down.set_defaults(func=_down)
    status = sub.add_parser("status", help="state of each VM; exit 1 if one died")
    status.set_defaults(func=_status)
    prune = sub.add_parser(
        "prune",
        help="remove cached images no current pin and fleet file use (running VMs' images stay)",
    )
    add_dry(prune, "only list them", old=("-n", "--dry-run"))
    prune.set_defaults(func=_prune)
    ssh = sub.add_parser("ssh", help="ssh to a lab host: ssh HOST [-- CMD...]")
    ssh.add_argument("host", metavar="HOST")
    ssh.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD")
    ssh.set_defaults(func=_ssh)


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(args.lab_dir, fleet_file=args.fleet)


def _up(args: argparse.Namespace) -> int:
    if args.strict_pins:
        os.environ[STRICT_PINS_ENV] = "1"  # read where each image resolves its kernel
    lab = _lab(args)
    lab.up(args.hosts or None)
    print(f"ssh -F {lab.ssh_config} HOST   (hosts: {', '.join(lab.hosts)})")
    return 0


def _down(args: argparse.Namespace) -> int:
    stopped = _lab(args).down()
    print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    return 0


def _status(args: argparse.Namespace) -> int:
    lab = _lab(args)
    rows = lab.status()
    if not rows:
        print(f"lab {lab.dir}: no VMs")
        return 0
    print(f"{'HOST':<16} {'STATE':<8} {'SSH':<4} {'PORT':<6} KERNEL")
    for r in rows:
        ssh = "-" if r.ssh_ok is None else ("ok" if r.ssh_ok else "FAIL")
        print(f"{r.name:<16} {r.state:<8} {ssh:<4} {r.port or '-':<6} {r.kernel_release or '-'}")
        if r.state == "died":
            print(f"  console log: {r.console}")
    return 1 if any(r.state == "died" or r.ssh_ok is False for r in rows) else 0


def _prune(args: argparse.Namespace) -> int:
    from ipvs_fleet.lab.image import cache_dir, prune_images

    # --fleet's images stay too (the lab's own fleet files' and $IPVS_FLEET_FLEET's always do)
    removed = prune_images(dry_run=args.dry, fleets=[args.fleet] if args.fleet else [])
    verb = "would remove" if args.dry else "removed"
    for path, why in removed:
        print(f"{verb} {path.name} ({why})")
    print(f"{verb} {len(removed)} cache entries from {cache_dir()}")
    return 0


def _ssh(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if args.host not in lab.hosts:
        known = ", ".join(lab.hosts) or "none, is it up?"
        raise FleetError(f"{args.host}: not a host of lab {lab.dir} (hosts: {known})")
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    return subprocess.run([*lab.ssh_command(args.host), *cmd]).returncode
