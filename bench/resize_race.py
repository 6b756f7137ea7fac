#!/usr/bin/env python3
"""A reuse that races the IPVS connection table's growth (7.2+): failed reconnects per side.

    IPVS_FLEET_LAB_DIR=.lab/t72 .venv/bin/python bench/resize_race.py --host k8s-sid \
        [--artifacts .test-artifacts] [--attempts 300] [--rounds 4]

7.2's connection table is resizable: a netns starts with 256 buckets and grows when its
connections pass size >> 2 (64, then 128, 256, ...). The growth moves each bucket's entries
to the new table by head insertion, so an older entry ends up ahead of a newer one with the
same tuple. A same-port reconnect that IPVS reschedules creates its new connection while the
old one is still hashed for a tick: when that creation is the one that crosses a threshold,
the resize runs at once, the lookups of the client's next packets find the old connection
first, and the request goes to the old real server (connected, then no answer). Rounds
alternate two sides on the same VM: the default load factor (the baseline; growth during the
run) and `conn_lfactor=4` (256 << 4 = 4,096 connections before the first growth: none in the
run). Scenario B (real server set to weight 0, the client gone) under the kube-proxy ruleset,
knob=1 when the fix module is loaded (`--artifacts`), else the stock modules; with
`--upstream`, the upstream series' patched IPVS set (build variant `upstream`, from
`--artifacts`) in place of the stack, bit 3 of conn_reuse_mode set (5), to measure the series'
fix of this race (patch 0002). Prints the failed reconnects per side, the attempt indices where
they failed, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ipvs_fleet.build.artifact import load_artifact  # noqa: E402
from ipvs_fleet.lab.lab import Lab  # noqa: E402
from ipvs_fleet.probe.harness import Guest, Plan  # noqa: E402

SIDES = {"default": {}, "conn_lfactor=4": {"conn_lfactor": 4}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", type=Path)
    ap.add_argument("--host", default="k8s-sid")
    ap.add_argument("--artifacts", type=Path, help="the fix module's artifacts (knob=1)")
    ap.add_argument("--attempts", type=int, default=300, help="B reconnects per run")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--upstream", action="store_true", help="the series' patched set (--artifacts/variants)"
    )
    ap.add_argument("--json", type=Path, help="write the result here")
    args = ap.parse_args()
    g = Guest(Lab(args.lab_dir), args.host)
    if args.upstream and not args.artifacts:
        ap.error("--upstream needs --artifacts (the folder its variants/ are under)")
    extra: dict[str, int] = {}
    knob: int | None = None
    if args.upstream:
        g.load_modules(load_artifact(args.artifacts, g.kernel_release, "upstream"), knob=False)
        extra = {"conn_reuse_mode": 5}  # bit 3: the series' kill before conntrack
        modules = "upstream series set"
    else:
        fix = load_artifact(args.artifacts, g.kernel_release) if args.artifacts else None
        g.load_modules(fix)
        knob, modules = (1, "fix module") if fix else (None, "stock")
    out: dict[str, dict[str, list[int]]] = {
        s: {"failed_at": [], "runs": [], "slow": []} for s in SIDES
    }
    for i in range(args.rounds):
        for side in list(SIDES)[i % 2 :] + list(SIDES)[: i % 2]:
            plan = Plan(
                rule="drop",
                knob=knob,
                scenarios={"B": args.attempts},
                ruleset="kube-proxy",
                ipvs_sysctls={**SIDES[side], **extra},
            )
            b = g.run_plan(plan)["scenarios"]["B"]
            failed = [a["index"] for a in b["attempts"] if a["error"]]
            out[side]["failed_at"] += failed
            out[side]["runs"].append(len(failed))
            out[side]["slow"].append(b["slow"])
            print(
                f"round {i + 1} {side:<15} {len(failed)} failed at {failed}, {b['slow']} slow",
                flush=True,
            )
    total = args.rounds * args.attempts
    base = len(out["default"]["failed_at"])
    for side, r in out.items():
        n = len(r["failed_at"])
        ratio = f"{n / base:.2f}" if base else "-"
        slow = sum(r["slow"])
        print(f"{side:<15} {n} of {total} failed (ratio to default {ratio}), {slow} slow")
    if args.json:
        doc = {"kernel": g.kernel_release, "modules": modules, **out}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
