#!/usr/bin/env python3
"""New-connection (SYN) rate through an IPVS NAT service: stock vs the fix module, knob=1.

    IPVS_FLEET_LAB_DIR=.lab .venv/bin/python bench/bench_synrate.py --host k8s-canary \
        [--seconds 5] [--rounds 6]

On one lab host where the fix module is installed (a deployed host), rounds alternate three
sides in this one process: stock (ip_vs_reuse unloaded: the baseline), the fix module loaded
with knob=1 in the host's netns (where the service lives), and stock again (`stock2`, an A/A
control: what this machine's noise alone does to the ratio). Each side runs
`inflight.py rate SECONDS`: one client opening and closing connections through a private
IPVS NAT service as fast as it goes (src/ipvs_fleet/probe/inflight.py). The side order
rotates each round. A side switch is rmmod / modprobe of ip_vs_reuse alone: IPVS stays
loaded. Prints connections per second per side and the ratios to the baseline; the host's
module state is put back at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ipvs_fleet.kernel import MODULE_NAME  # noqa: E402
from ipvs_fleet.lab.lab import Lab  # noqa: E402
from ipvs_fleet.probe.inflight import GUEST_PATH, install  # noqa: E402

KNOB = "net.ipv4.vs.conn_reuse_old_conntrack"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", type=Path)
    ap.add_argument("--host", default="k8s-canary")
    ap.add_argument("--seconds", type=float, default=5.0, help="per side and round")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    lab = Lab(args.lab_dir)
    h = args.host

    def run(cmd: str) -> str:
        return str(lab.run(h, cmd, timeout=300).stdout)

    was = run(f"test -d /sys/module/{MODULE_NAME} && echo yes; true").strip() == "yes"
    if run(f"modinfo -n {MODULE_NAME} 2>/dev/null; true").strip() == "":
        print(f"{h}: {MODULE_NAME} is not installed (deploy the host first)", file=sys.stderr)
        return 2
    install(lab, h)
    sides = ["stock", "knob1", "stock2"]
    rates: dict[str, list[float]] = {s: [] for s in sides}
    t0 = time.monotonic()
    try:
        for i in range(args.rounds):
            for side in sides[i % 3 :] + sides[: i % 3]:
                if side == "knob1":
                    run(f"modprobe {MODULE_NAME} && sysctl -qw {KNOB}=1")
                else:
                    run(f"rmmod {MODULE_NAME} 2>/dev/null; true")
                out = run(f"python3 {GUEST_PATH} rate {args.seconds}")
                r = json.loads(out.strip().splitlines()[-1])
                if r["errors"]:
                    print(f"round {i + 1} {side}: {r['errors']} failed connects", file=sys.stderr)
                    return 1
                rates[side].append(r["per_second"])
                print(
                    f"round {i + 1:2d} {side:6s}: {r['per_second']:8.1f} connections/s "
                    f"({r['connections']} in {r['seconds']} s)",
                    flush=True,
                )
    finally:
        run(f"rmmod {MODULE_NAME} 2>/dev/null; true")
        if was:
            run(f"modprobe {MODULE_NAME} && sysctl --system >/dev/null")
    med = {s: statistics.median(v) for s, v in rates.items()}
    result = {
        "host": h,
        "rounds": args.rounds,
        "seconds_per_side": args.seconds,
        "median_per_second": med,
        "ratio knob1/stock": round(med["knob1"] / med["stock"], 3),
        "ratio stock2/stock (A/A noise)": round(med["stock2"] / med["stock"], 3),
        "per_round": rates,
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result) + "\n")
    print(json.dumps(result))
    print(
        f"connection rate ip_vs_reuse knob=1 / stock: {result['ratio knob1/stock']:.3f} "
        f"(A/A stock2 / stock: {result['ratio stock2/stock (A/A noise)']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
