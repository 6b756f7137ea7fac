#!/usr/bin/env python3
"""Ordinary short connections through the VIP: stock modules vs patched knob=1, one run.

    IPVS_FLEET_LAB_DIR=.lab .venv/bin/python bench/bench_ordinary.py --host k8s-canary \
        --artifacts artifacts [--total 10000] [--rounds 4]

Rounds alternate stock / knob=1 on the same VM (INVALID-drop rule, ephemeral source ports),
so background load hits both alike; prints p50/p99 per side and the knob=1/stock ratios.
The stock side is the baseline. The host's own modules are put back at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ipvs_fleet.build.artifact import load_artifact  # noqa: E402
from ipvs_fleet.lab.lab import Lab  # noqa: E402
from ipvs_fleet.probe.harness import Guest, Plan  # noqa: E402
from ipvs_fleet.probe.probe import percentile  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", type=Path)
    ap.add_argument("--host", default="k8s-canary")
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--total", type=int, default=10000, help="connections per side")
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    g = Guest(Lab(args.lab_dir), args.host)
    art = load_artifact(args.artifacts, g.kernel_release)
    before = g.status()
    per_round = args.total // args.rounds
    samples: dict[str, list[float]] = {"stock": [], "knob1": []}
    t0 = time.monotonic()
    try:
        for i in range(args.rounds):
            for side in ("stock", "knob1"):
                g.load_modules(None if side == "stock" else art)
                r = g.run_plan(Plan(rule="drop", knob=None if side == "stock" else 1,
                                    ordinary=per_round))  # fmt: skip
                o = r["ordinary"]
                samples[side] += o["samples_ms"]
                print(f"round {i + 1} {side}: {o['count']} connects, {o['errors']} errors, "
                      f"{o['slow']} slow, p99 {percentile(o['samples_ms'], 99)} ms", flush=True)
    finally:
        g.restore(before)
    stats = {q: {s: percentile(v, int(q[1:])) for s, v in samples.items()} for q in ("p50", "p99")}
    out = {
        "kernel_release": g.kernel_release,
        "n": {s: len(v) for s, v in samples.items()},
        **stats,
        "ratio knob1/stock": {q: round(v["knob1"] / v["stock"], 3) for q, v in stats.items()},
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
