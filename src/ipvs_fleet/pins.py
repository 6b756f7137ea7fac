"""ipvs-fleet pins show | check | update: the kernel pins lock of the builds and lab images.

The lock (src/ipvs_fleet/kernel_pins.lock.json, or $IPVS_FLEET_PINS_LOCK) names one Debian
kernel per release. "show" prints it (no network); "update" resolves the newest kernel of each
release from the archive, prints old -> new per release and writes the lock (commit it);
"check" tells whether the archive still has each locked kernel (exit 1 if one is gone: builds
and lab images then use the newest kernel of that release, with a warning, or fail with
--strict-pins / IPVS_FLEET_STRICT_PINS=1).

Examples:

    ipvs-fleet pins show
    ipvs-fleet pins update --dry
    ipvs-fleet pins update && git add src/ipvs_fleet/kernel_pins.lock.json
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ipvs_fleet import debian
from ipvs_fleet.cliopts import add_dry
from ipvs_fleet.debian import RELEASES, KernelPin
from ipvs_fleet.errors import ConfigError


def _pin(pin: KernelPin | None) -> str:
    return f"{pin.kernel_release} {pin.version}" if pin else "(none)"


def diff_lines(old: dict[str, KernelPin], new: dict[str, KernelPin]) -> list[str]:
    """One line per release: `release  old -> new`, or `release  pin (unchanged)`."""
    out = []
    for r in RELEASES:
        if r not in old and r not in new:
            continue
        a, b = old.get(r), new.get(r)
        what = f"{_pin(a)} (unchanged)" if a == b else f"{_pin(a)} -> {_pin(b)}"
        out.append(f"{r:<9} {what}")
    return out


def _lock(args: argparse.Namespace) -> Path:
    return Path(args.lock) if args.lock else debian.lock_path()


def _show(args: argparse.Namespace) -> int:
    path = _lock(args)
    pins = debian.locked_pins(path)
    print(f"kernel pins in {path}:")
    for r in RELEASES:
        print(f"{r:<9} {_pin(pins.get(r))}")
    return 0


def _check(args: argparse.Namespace) -> int:
    path = _lock(args)
    pins = debian.locked_pins(path)
    gone = 0
    for r in RELEASES:
        pin = pins.get(r)
        if pin is None:
            print(f"{r:<9} not locked")
            gone += 1
            continue
        available = debian.archive_kernels(r)
        if pin == available[0]:
            state = "in the archive, newest"
        elif pin in available:
            state = f"in the archive; newer: {_pin(available[0])}"
        else:
            gone += 1
            state = f"GONE from the archive; builds and images use {_pin(available[0])}"
        print(f"{r:<9} {_pin(pin)}: {state}")
    if gone:
        print(f"{gone} pin(s) not in the archive: run `ipvs-fleet pins update` ({path})")
    return 1 if gone else 0


def _update(args: argparse.Namespace) -> int:
    path = _lock(args)
    try:
        old = debian.locked_pins(path)
    except ConfigError:
        if path.exists():
            raise  # a malformed lock is for a human to look at, not to overwrite
        old = {}
    new = {r: debian.resolve_kernel(r) for r in RELEASES}
    for line in diff_lines(old, new):
        print(line)
    changed = sum(old.get(r) != new[r] for r in RELEASES)
    if args.dry:
        print(f"{changed} of {len(new)} pins would change (dry run: {path} not written)")
    elif changed or debian.lock_text(new) != (path.read_text() if path.exists() else ""):
        debian.write_lock(new, path)
        print(f"wrote {path}: {changed} of {len(new)} pins changed")
    else:
        print(f"{path}: up to date")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "pins",
        help="the kernel pins lock (show, check against the archive, update)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--lock", help=f"lock file (default: ${debian.PINS_LOCK_ENV} or the package's)")
    s = p.add_subparsers(dest="pins_command", required=True)
    s.add_parser("show", help="print the locked pins (no network)").set_defaults(func=_show)
    s.add_parser(
        "check", help="is each locked kernel still in the archive? (exit 1 if one is gone)"
    ).set_defaults(func=_check)
    u = s.add_parser("update", help="lock the newest kernel of each release; prints old -> new")
    add_dry(u, "print the diff, write nothing", old=("-n", "--dry-run"))
    u.set_defaults(func=_update)
