#!/usr/bin/env python3
"""Ordinary short connections through the VIP: stock modules vs the fix module, knob=1, one run.

    IPVS_FLEET_LAB_DIR=.lab .venv/bin/python bench/bench_ordinary.py --host k8s-canary \
        --artifacts artifacts [--total 10000] [--rounds 20]

Rounds alternate three sides on the same VM in this one process (INVALID-drop rule,
ephemeral source ports): stock (the baseline), the artifact's fix module ip_vs_reuse loaded
on top of the kernel's own ip_vs with knob=1, and stock again (`stock2`, an A/A control: what
the noise of this machine alone does to the ratio). A side switch is rmmod / insmod of
ip_vs_reuse alone: IPVS stays loaded. The side order rotates each round so that background
load and drift hit every side alike. Prints p50/p90/p99 per side and the ratios to the
baseline. The host's own modules are put back at the end.
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
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--json", type=Path, help="write the result (with every sample) here")
    args = ap.parse_args()
    g = Guest(Lab(args.lab_dir), args.host)
    art = load_artifact(args.artifacts, g.kernel_release)
    before = g.status()
    per_round = args.total // args.rounds
    sides = ["stock", "knob1", "stock2"]
    samples: dict[str, list[float]] = {s: [] for s in sides}
    t0 = time.monotonic()
    try:
        for i in range(args.rounds):
            for side in sides[i % 3 :] + sides[: i % 3]:
                fix = side == "knob1"
                g.load_modules(art if fix else None)
                r = g.run_plan(Plan(rule="drop", knob=1 if fix else None, ordinary=per_round))
                o = r["ordinary"]
                if o["errors"] or r["kernel_warnings"]:
                    print(
                        f"round {i + 1} {side}: {o['errors']} errors, "
                        f"kernel warnings {r['kernel_warnings']}",
                        file=sys.stderr,
                    )
                    return 1
                samples[side] += o["samples_ms"]
                print(
                    f"round {i + 1:2d} {side:6s}: {o['count']} connects, {o['slow']} slow, "
                    f"p99 {percentile(o['samples_ms'], 99)} ms",
                    flush=True,
                )
    finally:
        g.restore(before)
    qs = ("p50", "p90", "p99")
    stats = {q: {s: percentile(v, int(q[1:])) or 0.0 for s, v in samples.items()} for q in qs}
    ratios = {
        side: {q: round(v[side] / v["stock"], 3) for q, v in stats.items()}
        for side in ("knob1", "stock2")
    }
    out = {
        "kernel_release": g.kernel_release,
        "set_id": art.set_id,
        "reuse_design": art.reuse_design,
        "rounds": args.rounds,
        "n": {s: len(v) for s, v in samples.items()},
        **stats,
        "ratio knob1/stock": ratios["knob1"],
        "ratio stock2/stock (A/A noise)": ratios["stock2"],
        "seconds": round(time.monotonic() - t0, 1),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**out, "samples_ms": samples}) + "\n")
    print(json.dumps(out))
    print(
        f"p99 ratio ip_vs_reuse knob=1 / stock: {ratios['knob1']['p99']:.3f} "
        f"(A/A stock2 / stock: {ratios['stock2']['p99']:.3f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
