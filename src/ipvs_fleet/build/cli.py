"""ipvs-fleet build: build the fix module ip_vs_reuse for the pinned Debian kernels.

Examples:

    ipvs-fleet build --release bookworm --out artifacts/
    ipvs-fleet build --all-lab --out artifacts/            # the lines at once (--jobs 3)
    IPVS_FLEET_FLEET=lab/fleet-7.2.yml ipvs-fleet build --all-lab --out artifacts/
    ipvs-fleet build --kernel-release 6.1.0-56-cloud-amd64 --release bookworm
    ipvs-fleet build --release bookworm --dkms dkms/

The kernels are the locked pins (see: ipvs-fleet pins show); a pin the archive no longer has is
replaced by the release's newest kernel with a warning, or is an error with --strict-pins.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ipvs_fleet import kernel
from ipvs_fleet.debian import (
    RELEASES,
    STRICT_PINS_ENV,
    KernelPin,
    check_release,
    pinned_kernel,
)
from ipvs_fleet.errors import ConfigError, FleetError


def targets(args: argparse.Namespace) -> list[KernelPin]:
    """The pinned kernels the arguments name."""
    from ipvs_fleet.build.build import pin_for

    if args.all_lab:
        from ipvs_fleet.lab.fleet import load_fleet

        return [pinned_kernel(r) for r in load_fleet().releases()]
    if not args.release:
        raise ConfigError("name a target: --release R [--kernel-release K], or --all-lab")
    check_release(args.release, "--release")
    return [pin_for(args.release, args.kernel_release, args.source_version)]


def say(tag: str, started: float, what: str) -> None:
    """One progress line of a kernel line's build, as the step starts."""
    print(f"{tag}: {what} ({time.monotonic() - started:.0f} s)", flush=True)


def build_lines(
    pins: list[KernelPin], jobs: int, build_one: Callable[[int, KernelPin], Any]
) -> list[Any]:
    """build_one(i, pin) for every pin, `jobs` at a time, results in the order of `pins`.
    Every line is built even when another fails (each line's outcome is its own); then the
    first failure is raised, naming its line, after the others have finished."""
    if jobs <= 1 or len(pins) <= 1:
        return [build_one(i, pin) for i, pin in enumerate(pins, 1)]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(build_one, i, pin) for i, pin in enumerate(pins, 1)]
        wait(futures)
    failed = [
        (pin, f.exception())
        for pin, f in zip(pins, futures, strict=True)
        if f.exception() is not None
    ]
    for pin, exc in failed:
        print(f"{pin.line} {pin.kernel_release}: build failed: {exc}", flush=True)
    if failed:
        pin, exc = failed[0]
        if isinstance(exc, FleetError):
            raise FleetError(
                f"{len(failed)} of {len(pins)} builds failed; first, "
                f"{pin.line} {pin.kernel_release}: {exc}"
            ) from exc
        raise exc  # type: ignore[misc]
    return [f.result() for f in futures]


def run(args: argparse.Namespace) -> int:
    from ipvs_fleet.build.build import build_for
    from ipvs_fleet.build.dkms import dkms_build, make_dkms_tree

    if args.strict_pins:
        os.environ[STRICT_PINS_ENV] = "1"
    if args.jobs < 1:
        raise ConfigError(f"--jobs must be 1 or more, not {args.jobs}")
    out = Path(args.out)
    pins = targets(args)

    def build_one(i: int, pin: KernelPin) -> Any:
        t0 = time.monotonic()
        tag = f"[{i}/{len(pins)}] {pin.line} {pin.kernel_release}"
        progress = functools.partial(say, tag, t0)
        art = build_for(pin, out, variant=args.variant, force=args.force, progress=progress)
        took = time.monotonic() - t0
        print(
            f"{pin.kernel_release}: {art.path} ({len(art.modules)} modules, "
            f"{art.set_id}, reuse={art.reuse_design}, {took:.1f}s)",
            flush=True,
        )
        return art

    build_lines(pins, args.jobs, build_one)
    if args.dkms:
        tree = make_dkms_tree(Path(args.dkms))
        print(f"DKMS source tree {tree}")
        for pin in pins:
            if args.dkms_test:
                dkms_build(pin, tree)
                print(f"{pin.kernel_release}: dkms build ok")
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "build",
        help="build the fix module ip_vs_reuse (artifact per kernel, from linux-headers)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--release", help=f"Debian release ({', '.join(RELEASES)})")
    p.add_argument("--kernel-release", help="uname -r to build for (default: the pinned one)")
    p.add_argument(
        "--source-version",
        help="Debian package version of that kernel's headers "
        "(needed when --kernel-release is not the release's pinned kernel)",
    )
    p.add_argument(
        "--all-lab",
        action="store_true",
        help="the pinned kernel of every release the lab fleet boots "
        "($IPVS_FLEET_FLEET, else lab/fleet.yml)",
    )
    p.add_argument("--out", default="artifacts", help="artifacts folder (default: artifacts)")
    p.add_argument(
        "--variant",
        choices=list(kernel.VARIANTS),
        help="test-only variant (baddefault: the knob reads 1 in a new netns; nodesign: no "
        "declared reuse design; upstream: a patched ip_vs set from the upstream series, 7.2 "
        "only); never deploy it",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=3,
        help="kernel lines built at once (default: 3; each line has its own builder root, "
        "and a cold one is mostly downloads and dpkg)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument(
        "--strict-pins",
        action="store_true",
        help="fail if a locked kernel pin is gone from the Debian archive (default: warn and "
        f"build for the newest kernel of the release; also ${STRICT_PINS_ENV}=1)",
    )
    p.add_argument("--dkms", metavar="DIR", help="also write the DKMS source tree under DIR")
    p.add_argument(
        "--dkms-test", action="store_true", help="and run 'dkms build' of it in the builder root"
    )
    p.set_defaults(func=run)
