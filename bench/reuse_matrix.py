#!/usr/bin/env python3
"""Measure the reuse matrix on the lab: kernel line x ruleset cell x modules/knob x scenario.

    .venv/bin/python bench/reuse_matrix.py --lab-dir .lab/test --artifacts .test-artifacts \
        [--hosts k8s-canary,k8s-node-1,ftp-director] [--out bench/results/reuse-matrix]

A cell is (ruleset, iptables backend, client, family) of `src/ipvs_fleet/probe/cells.py`:
the minimal INVALID-drop cell, kube-proxy's IPVS-mode ruleset (NodePort from an outside
client, ClusterIP from a pod, a host-network client on the node), masquerade-all, Calico's
chains, iptables-nft and -legacy, IPv4 and IPv6; every cell with the INVALID-drop rule.
"The module" is the artifact's fix module ip_vs_reuse, loaded on top of the kernel's own
ip_vs; switching between stock and the module is rmmod / insmod of it alone (IPVS stays
loaded). Per line and cell: stock modules and the module with knob=0 (the drop must show: the
cell is live), the module with knob=1 (200 reconnects per cell: 40 of each of A, B, B2, C1, C2,
and the module's kills of stale conntrack entries), the UDP scenario, conntrack after a reuse,
and, on the NodePort cell, 10,000 ordinary short connections per side with stock and knob=1
in alternating rounds in this one run (p99 ratio). B2 and U hold IPVS's flush of a deleted
real server's connections (`Plan.hold_flush`), so their measured packet meets the old
connection every time. The lines run in parallel, one VM each (the slow/failed verdicts are
robust to that; the p99 ratio compares sides of one run). Writes every run's JSON, a CDF per
line and cell, and the Markdown table (`--doc`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from ipvs_fleet.build.artifact import load_artifact  # noqa: E402
from ipvs_fleet.lab.lab import Lab  # noqa: E402
from ipvs_fleet.probe.harness import SCENARIOS, Guest, Plan, cell_label, summarize  # noqa: E402
from ipvs_fleet.probe.plot import plot_files  # noqa: E402
from ipvs_fleet.probe.probe import percentile  # noqa: E402

Cell = tuple[str, str, str, int]
CELLS: list[Cell] = [
    ("minimal", "nft", "outside", 4),
    ("kube-proxy", "nft", "outside", 4),
    ("kube-proxy", "nft", "pod", 4),
    ("kube-proxy", "nft", "host", 4),
    ("kube-proxy", "legacy", "outside", 4),
    ("kube-proxy", "legacy", "host", 4),
    ("kube-proxy-masq-all", "nft", "pod", 4),
    ("calico", "nft", "outside", 4),
    ("calico", "nft", "pod", 4),
    ("calico", "nft", "host", 4),
    ("kube-proxy", "nft", "outside", 6),
    ("kube-proxy", "nft", "pod", 6),
    ("kube-proxy", "nft", "host", 6),
    ("calico", "legacy", "pod", 6),
]
ORDINARY_CELL: Cell = ("kube-proxy", "nft", "outside", 4)
KNOB1 = {**dict.fromkeys(SCENARIOS, 40), "U": 5}
SLOW = {"A": 3, "B": 3, "B2": 3, "C1": 2, "U": 3}  # each drop costs ~1 s
CONFIGS = (("stock", None, SLOW), ("knob0", 0, SLOW), ("knob1", 1, KNOB1))
ORDINARY_SIDES = (("stock", None), ("knob1", 1), ("stock2", None))


# matplotlib's text parser is not thread-safe: the lines' plots are drawn one at a time.
PLOT_LOCK = threading.Lock()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def key(cell: Cell) -> str:
    return "-".join(map(str, cell))


def plan(cell: Cell, knob: int | None, scenarios: dict[str, int], **kw: Any) -> Plan:
    ruleset, backend, client, family = cell
    return Plan(
        rule="drop",
        knob=knob,
        ruleset=ruleset,
        iptables=backend,
        client=client,
        family=family,
        scenarios=scenarios,
        conntrack_check=knob == 1,
        hold_flush=True,
        **kw,
    )


def run_line(
    g: Guest, art: Any, out: Path, ordinary: int, rounds: int, configs: list[str]
) -> dict[str, Any]:
    before = g.status()
    line = ".".join(g.kernel_release.split(".")[:2])
    res: dict[str, Any] = {
        "host": g.host,
        "kernel_release": g.kernel_release,
        "line": line,
        "set_id": art.set_id,
        "reuse_design": art.reuse_design,
        "runs": {},
    }
    try:
        for label, knob, counts in CONFIGS:
            if label not in configs:
                continue
            g.load_modules(None if knob is None else art)
            for cell in CELLS:
                t0 = time.monotonic()
                r = g.run_plan(plan(cell, knob, counts, ftp=cell == CELLS[0] and knob == 0))
                (out / f"{line}-{label}-{key(cell)}.json").write_text(json.dumps(r) + "\n")
                res["runs"][f"{label}/{key(cell)}"] = r
                log(
                    f"{line} {label} {cell_label(r)}: {time.monotonic() - t0:.0f} s "
                    + " ".join(
                        f"{k}={v['slow']}/{v['errors']}/{v['count']}"
                        for k, v in summarize(r).items()
                    )
                )
        # stock2 is a second stock side in the same rounds: its ratio to stock is the A/A
        # noise floor that the knob=1 ratio is read against.
        samples: dict[str, list[float]] = {label: [] for label, _ in ORDINARY_SIDES}
        for _ in range(rounds if ordinary else 0):
            for label, knob in ORDINARY_SIDES:
                g.load_modules(None if knob is None else art)
                r = g.run_plan(plan(ORDINARY_CELL, knob, {}, ordinary=ordinary // rounds))
                samples[label] += r["ordinary"]["samples_ms"]
                res.setdefault("ordinary_runs", []).append(
                    {
                        "label": label,
                        "summary": summarize(r)["ordinary"],
                        "kernel_warnings": r["kernel_warnings"],
                    }
                )
        if ordinary:
            res["ordinary"] = {
                k: {
                    "n": len(v),
                    "p50": percentile(v, 50),
                    "p90": percentile(v, 90),
                    "p99": percentile(v, 99),
                    "max": max(v) if v else None,
                }
                for k, v in samples.items()
            }
            (out / f"{line}-ordinary.json").write_text(
                json.dumps(
                    {
                        "summary": res["ordinary"],
                        "samples_ms": samples,
                        "rounds": res["ordinary_runs"],
                    }
                )
                + "\n"
            )
            res["ordinary_samples"] = samples
            log(f"{line} ordinary: {res['ordinary']}")
            log(f"{line} ordinary p99 ratio: {ordinary_ratios(res['ordinary'])}")
    finally:
        g.restore(before)
    # The table holds every configuration measured into `out` (an earlier run's too).
    for label, _, _ in CONFIGS:
        for cell in CELLS:
            f = out / f"{line}-{label}-{key(cell)}.json"
            if f"{label}/{key(cell)}" not in res["runs"] and f.exists():
                res["runs"][f"{label}/{key(cell)}"] = json.loads(f.read_text())
    o = out / f"{line}-ordinary.json"
    if "ordinary" not in res and o.exists():
        saved = json.loads(o.read_text())
        res["ordinary"], res["ordinary_samples"] = saved["summary"], saved.get("samples_ms", {})
    for cell in CELLS:
        paths = [out / f"{line}-{label}-{key(cell)}.json" for label, _, _ in CONFIGS]
        try:
            with PLOT_LOCK:
                plot_files(
                    [p for p in paths if p.exists()],
                    out / f"{line}-{key(cell)}.png",
                    scenario="A",
                    title=f"Debian {g.kernel_release}, {key(cell)}: "
                    "scenario A (stock, knob=0, knob=1)",
                )
        except Exception as e:  # a plot is a by-product
            log(f"no plot {line} {key(cell)}: {e}")
    return res


def ordinary_ratios(summary: dict[str, dict[str, Any]]) -> str:
    """`knob1/stock 1.03, stock2/stock 0.99` (p99) from the ordinary summary."""
    base = summary.get("stock", {}).get("p99")
    return (
        ", ".join(
            f"{k}/stock {v['p99'] / base:.2f}"
            for k, v in summary.items()
            if k != "stock" and base and v.get("p99") is not None
        )
        or "-"
    )


def p99_ratio_ci(
    base: list[float], other: list[float], n: int = 1000, seed: int = 1
) -> tuple[float, float]:
    """95% bootstrap interval of p99(other) / p99(base): both sides resampled with
    replacement, n times (a fixed seed, so a regenerated table does not move)."""
    rng = random.Random(seed)

    def p99(xs: list[float]) -> float:
        return percentile(rng.choices(xs, k=len(xs)), 99) or 0.0  # never None: xs not empty

    ratios = sorted(p99(other) / p99(base) for _ in range(n))
    return ratios[int(0.025 * n)], ratios[int(0.975 * n) - 1]


def cell_text(row: dict[str, Any]) -> str:
    return f"{row['slow']}/{row['errors']} of {row['count']}"


def verdict(r: dict[str, Any]) -> str:
    """The knob=1 extras of a run: the module's kills, NEW counted (mangle and nat),
    masquerade as demanded, conntrack, live."""
    every = summarize(r)
    rows = {k: v for k, v in every.items() if k != "U"}
    kills = "/".join(
        f"{k} {v.get('killed_tcp' if k != 'U' else 'killed_udp')} of {v.get('old_conn_met')}"
        for k, v in every.items()
        if k in ("A", "B", "B2", "U")
    )
    new_ok = all(
        v.get(c) in (None, 2 * v["count"]) for v in rows.values() for c in ("new_conns", "nat_new")
    )
    masq_ok = all(not v.get("masq_mismatch") for v in rows.values())
    live = all(v["live"] == v["count"] - v["errors"] for v in rows.values())
    ct = r.get("conntrack", {})
    ct_ok = bool(ct) and all(v.get("consistent") for v in ct.values())
    peers = sorted({k for v in r.get("scenarios", {}).values() for k in v.get("peer_kinds", {})})
    return (
        f"kills of met: {kills or '-'}; NEW x2: {'yes' if new_ok else 'NO'}; "
        f"real server saw: {'/'.join(peers) or '-'}"
        f"{'' if masq_ok else ' (MISMATCH)'}; conntrack: "
        f"{'1 entry, new server' if ct_ok else 'INCONSISTENT'}; "
        f"live: {'yes' if live else 'NO'}"
    )


def render(lines: list[dict[str, Any]], out: Path, elapsed: float, doc: Path) -> str:
    # relative to the page (an --out outside the repository crashed relative_to)
    rel = os.path.relpath(out.resolve(), doc.resolve().parent)
    t = [
        "# Reuse results: the 1-second drop under the rulesets Kubernetes nodes run",
        "",
        f"Measured by `bench/reuse_matrix.py` in lab VMs (QEMU TCG, real Debian cloud "
        f"kernels); rendered {time.strftime('%Y-%m-%d')} from the JSON of the runs in "
        f"`{rel}` (the last run: {elapsed / 60:.0f} min). Cells (ruleset / iptables "
        "backend / client / family) and scenarios: `src/ipvs_fleet/probe/` (cells.py, "
        "scenarios.py); every cell has the INVALID-drop "
        "rule. Each entry: slow (connect >= 900 ms) / failed of attempts of the same-port "
        "reconnect. U: UDP to a removed real server, slow = needed the 1 s retry. The module: "
        "the fix module ip_vs_reuse on top of the kernel's own ip_vs; kills: its "
        "killed_tcp (U: killed_udp) of the attempts that met an old connection.",
        "",
        "| line | cell | modules | A | B | B2 | C1 | C2 | U | knob=1: kills, NEW counted, "
        "masquerade, conntrack, live servers |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ln in lines:
        for cell in CELLS:
            for label, _, _ in CONFIGS:
                r = ln["runs"].get(f"{label}/{key(cell)}")
                if r is None:
                    continue
                rows = summarize(r)
                mods = {
                    "stock": "stock",
                    "knob0": "ip_vs_reuse, knob=0",
                    "knob1": "ip_vs_reuse, knob=1",
                }[label]
                t.append(
                    f"| {ln['line']} | {cell_label(r)} | {mods} | "
                    + " | ".join(
                        cell_text(rows[s]) if s in rows else "-" for s in (*SCENARIOS, "U")
                    )
                    + f" | {verdict(r) if label == 'knob1' else ''} |"
                )
    t += [
        "",
        "Ordinary short connections (ephemeral ports, kube-proxy NodePort cell), stock vs "
        "ip_vs_reuse knob=1, alternating rounds in one run (stock, knob=1, stock again: the "
        "second stock side's ratio is the A/A noise of the run). The interval is a 95% "
        "bootstrap of the p99 ratio over the connections; it does not cover drift between "
        "rounds (the controller's load), which the A/A row shows:",
        "",
        "| line | modules | n | p50 ms | p90 ms | p99 ms | p99 / stock | 95% interval |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = {"stock": "stock", "knob1": "ip_vs_reuse, knob=1", "stock2": "stock again (A/A)"}
    for ln in lines:
        o = ln.get("ordinary", {})
        for label in (x for x in names if x in o):
            x = o[label]
            ratio = "" if label == "stock" else f"{x['p99'] / o['stock']['p99']:.2f}"
            smp = ln.get("ordinary_samples", {})
            ci = ""
            if label != "stock" and smp.get(label) and smp.get("stock"):
                lo, hi = p99_ratio_ci(smp["stock"], smp[label])
                ci = f"{lo:.2f}-{hi:.2f}"
            t.append(
                f"| {ln['line']} | {names[label]} | {x['n']} | {x['p50']:.2f} | "
                f"{x['p90']:.2f} | {x['p99']:.2f} | {ratio} | {ci} |"
            )
    warn = {
        f"{ln['line']} {k}": r["kernel_warnings"]
        for ln in lines
        for k, r in ln["runs"].items()
        if r["kernel_warnings"]
    }
    ftp = {
        ln["line"]: (ln["runs"].get(f"knob0/{key(CELLS[0])}") or {}).get("ftp", {}).get("ok")
        for ln in lines
    }
    t += [
        "",
        f"Kernel warnings in dmesg over all runs: {warn or 'none'}. Passive FTP through "
        f"ip_vs_ftp with knob=0: {ftp}.",
        "",
        f"Latency CDFs (scenario A, stock / knob=0 / knob=1) per line and cell: "
        f"`{rel}/<line>-<cell>.png`; raw JSON of every run next to them.",
        "",
        "Notes:",
        "- TCG latencies on a 2-core controller shared by three VMs: compare within a run.",
        "- B2 and U hold IPVS's own flush of a removed real server's connections on 5.9+ "
        "(04231e52d355) around the deletion, so the measured packet meets the old "
        "connection every time (racing the flush, some would pass without the drop).",
        "- `tests/lab/test_reuse.py` runs a reduced matrix of this on every line in `make test`.",
        "",
    ]
    return "\n".join(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lab-dir", type=Path)
    ap.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    ap.add_argument("--hosts", help="comma-separated lab hosts (default: all)")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "reuse-matrix")
    ap.add_argument("--doc", type=Path, default=REPO / "docs" / "reuse-results.md")
    ap.add_argument("--ordinary", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument(
        "--sequential",
        action="store_true",
        help="one line at a time (a quiet controller for the ordinary p99s)",
    )
    ap.add_argument(
        "--configs",
        default="stock,knob0,knob1",
        help="which of stock, knob0, knob1 to measure now; the table also takes "
        "the others' JSON from an earlier run into --out",
    )
    args = ap.parse_args()
    lab = Lab(args.lab_dir)
    hosts = args.hosts.split(",") if args.hosts else sorted(lab.hosts)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    guests = [Guest(lab, h) for h in hosts]
    with ThreadPoolExecutor(1 if args.sequential else len(guests)) as pool:
        jobs = []
        for g in guests:
            art = load_artifact(args.artifacts, g.kernel_release)
            log(f"{g.host}: {g.kernel_release}, artifact {art.set_id} ({art.reuse_design})")
            jobs.append(
                pool.submit(
                    run_line, g, art, args.out, args.ordinary, args.rounds, args.configs.split(",")
                )
            )
        lines = [j.result() for j in jobs]
    lines.sort(key=lambda ln: [int(x) for x in ln["line"].split(".")])
    (args.out / "summary.json").write_text(
        json.dumps(
            [
                {k: v for k, v in ln.items() if k not in ("runs", "ordinary_samples")}
                for ln in lines
            ],
            indent=1,
        )
        + "\n"
    )
    args.doc.write_text(render(lines, args.out, time.monotonic() - t0, args.doc))
    log(f"wrote {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
