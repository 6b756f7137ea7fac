"""ipvs-fleet demo: the main job on the embedded lab, start to finish, with a summary.

Boots the lab while it builds the module set for every kernel the lab runs (QEMU on one
side, downloads and compiles on the other: together they take about as long as the longer
of the two), rolls the deploy out in canary waves with gates, runs the compliance checks,
measures the reuse scenario on the canary, and prints where each report is. Each step is the
same command a user would run.

The demo's fleet is lab/fleet-demo.yml (DEMO_FLEET): the canary and the FTP director of
lab/fleet.yml, both on bookworm, so a first run makes one image and one builder root,
compiles one module set and boots two VMs (cold on 2 cores, the three-kernel fleet takes
about 9 minutes). `--fleet` (or $IPVS_FLEET_FLEET) names another, e.g. lab/fleet.yml.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from ipvs_fleet.resources import data_path, workdir

STEPS = ("lab", "build", "rollout", "check", "probe")
# Steps that run at the same time (their output lines prefixed with the step's name:
# `lab up` marks its own lines [lab] already).
TOGETHER = ("lab", "build")

Step = tuple[str, str, list[str]]  # key, title, command

DEMO_FLEET = "lab/fleet-demo.yml"


def demo_fleet(arg: str | None) -> Path:
    """The fleet the demo boots: --fleet, else $IPVS_FLEET_FLEET, else DEMO_FLEET (the
    user's file of that name, else the packaged one)."""
    given = arg or os.environ.get("IPVS_FLEET_FLEET")
    if given:
        return Path(given).absolute()
    mine = workdir() / DEMO_FLEET
    return mine if mine.is_file() else data_path(DEMO_FLEET)


def _run(title: str, cmd: list[str], env: dict[str, str]) -> tuple[int, float]:
    print(f"\n==> {title}\n    $ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    rc = subprocess.run(cmd, cwd=workdir(), env=env).returncode
    took = time.monotonic() - t0
    print(f"    {'ok' if rc == 0 else f'exit {rc}'} in {took:.0f} s", flush=True)
    return rc, took


def _relay(key: str, proc: subprocess.Popen[str], started: float,
           out: dict[str, tuple[int, float]]) -> None:  # fmt: skip
    """Print a child's lines as they come, prefixed with its step; record its exit."""
    with proc:  # closes the pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            print(f"    {key:<5} | {line.rstrip()}", flush=True)
    rc = proc.returncode
    out[key] = (rc, time.monotonic() - started)
    print(f"    {key:<5} | {'ok' if rc == 0 else f'exit {rc}'} in {out[key][1]:.0f} s", flush=True)


def run_together(steps: list[Step], env: dict[str, str]) -> dict[str, tuple[int, float]]:
    """Run the steps' commands at the same time; (exit code, seconds) of each."""
    print("\n==> " + "; at the same time: ".join(title for _, title, _ in steps), flush=True)
    for key, _, cmd in steps:
        print(f"    {key:<5} | $ {' '.join(cmd)}", flush=True)
    out: dict[str, tuple[int, float]] = {}
    threads = []
    for key, _, cmd in steps:
        proc = subprocess.Popen(cmd, cwd=workdir(), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip
        t = threading.Thread(target=_relay, args=(key, proc, time.monotonic(), out))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return {key: out[key] for key, _, _ in steps}


def stages(plan: list[Step], skip: list[str]) -> list[list[Step]]:
    """The plan's steps minus the skipped ones, in stages: TOGETHER's steps share one."""
    out: list[list[Step]] = []
    for step in plan:
        if step[0] in skip:
            continue
        if step[0] in TOGETHER and out and out[-1][0][0] in TOGETHER:
            out[-1].append(step)
        else:
            out.append([step])
    return out


def run(args: argparse.Namespace) -> int:
    cli = str(Path(sys.executable).with_name("ipvs-fleet"))
    labdir = Path(os.environ.get("IPVS_FLEET_LAB_DIR", workdir() / ".lab"))
    artifacts = Path(os.environ.get("IPVS_FLEET_ARTIFACTS", workdir() / "artifacts"))
    reports = Path(args.reports)
    reports.mkdir(parents=True, exist_ok=True)
    fleet = demo_fleet(args.fleet)
    # `lab up` boots this fleet and `build --all-lab` builds for its kernels
    env = dict(
        os.environ,
        IPVS_FLEET_LAB_DIR=str(labdir),
        IPVS_FLEET_ARTIFACTS=str(artifacts),
        IPVS_FLEET_FLEET=str(fleet),
    )
    print(f"fleet: {fleet}", flush=True)
    inventory = "inventory/lab.py"
    plan: list[Step] = [
        ("lab", "Boot the lab fleet", [cli, "lab", "up"]),
        # At nice 10: the VMs boot under TCG while the lines compile, and a guest starved of
        # CPU boots several times slower (cold demo: VMs 167 s to SSH, a compile 184 s).
        ("build", "Build the patched modules for the lab's kernels",
         ["nice", "-n", "10", cli, "build", "--all-lab", "--out", str(artifacts)]),
        ("rollout", "Roll out in canary waves (deploy, gate, next wave)",
         [cli, "rollout", inventory, "--json", str(reports / "rollout.json"),
          "--journal", str(reports / "rollout.jsonl")]),
        ("check", "Compliance checks",
         [cli, "check", inventory, "--junitxml", str(reports / "checks.xml"),
          "--json", str(reports / "checks.json"), "--report", str(reports / "checks.md")]),
        # kube-proxy's own IPVS-mode ruleset (its mark-based masquerade), a NodePort from an
        # outside client: where the 1.x design failed every reused connection
        ("probe", "Reuse scenario on the canary (kube-proxy's ruleset, NodePort, knob=1)",
         [cli, "probe", "scenario", "--host", "k8s-canary", "--ruleset", "kube-proxy",
          "--knob", "1", "--scenarios", "A=50,B=20", "--conntrack",
          "--json", str(reports / "probe.json")]),
    ]  # fmt: skip
    results: dict[str, tuple[int, float]] = {}
    started = time.monotonic()
    for stage in stages(plan, args.skip):
        if len(stage) > 1:
            results |= run_together(stage, env)
        else:
            key, title, cmd = stage[0]
            results[key] = _run(title, cmd, env)
        if any(results[k][0] != 0 for k, _, _ in stage if k in TOGETHER):
            break  # nothing after this can run
    if results.get("probe", (1, 0))[0] == 0:
        _run("Latency plot", [cli, "probe", "plot", str(reports / "probe.json"),
                              "-o", str(reports / "probe.png")], env)  # fmt: skip
    print("\n==> Summary")
    for key, (rc, took) in results.items():
        print(f"    {key:<8} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {took:6.0f} s")
    print(f"    {'total':<8} {'':<18} {time.monotonic() - started:6.0f} s (wall)")
    _print_probe(reports / "probe.json")
    print(f"    reports: {reports}/ (rollout.json, checks.xml, checks.md, probe.json, probe.png)")
    print("    stop the lab: ipvs-fleet lab down")
    return 0 if all(rc == 0 for rc, _ in results.values()) else 1


def _print_probe(path: Path) -> None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    from ipvs_fleet.probe.harness import summarize

    for name, r in summarize(doc).items():
        print(
            f"    scenario {name:<8} {r['count']} connects, {r['slow']} slow (>= 0.9 s), "
            f"{r['errors']} errors, p50 {r['p50']:.1f} ms, p99 {r['p99']:.1f} ms"
        )


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="the main job on the lab: build, canary rollout, checks")
    p.add_argument("--reports", default=str(workdir() / "reports" / "demo"), help="report folder")
    p.add_argument(
        "--fleet",
        help=f"lab fleet file (default: $IPVS_FLEET_FLEET, else {DEMO_FLEET}: the canary and "
        "the FTP director of lab/fleet.yml on bookworm, one image and one module set)",
    )
    p.add_argument(
        "--skip", action="append", default=[], choices=STEPS, help="skip a step (repeatable)"
    )
    p.set_defaults(func=run)
