"""ipvs-fleet demo: the main job on the embedded lab, start to finish, with a summary.

Boots the lab while it builds the module set for every kernel the lab runs (QEMU on one
side, downloads and compiles on the other: together they take about as long as the longer
of the two), rolls the deploy out in canary waves with gates, runs the compliance checks,
measures the reuse scenario on the canary, and prints where each report is. Each step is the
same command a user would run. All through the rollout, HELD connections stay open through a
private IPVS NAT service on the canary (`ipvs_fleet.probe.inflight.held`): the fix module is
activated without unloading IPVS, so none may break; the summary says how many did (any
broken one fails the demo). If they cannot be set up, the demo says so and goes on.

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
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ipvs_fleet.lab import Lab
from ipvs_fleet.probe import inflight
from ipvs_fleet.resources import data_path, workdir

STEPS = ("lab", "build", "rollout", "check", "probe")
# Steps that run at the same time (their output lines prefixed with the step's name:
# `lab up` marks its own lines [lab] already).
TOGETHER = ("lab", "build")

Step = tuple[str, str, list[str]]  # key, title, command

DEMO_FLEET = "lab/fleet-demo.yml"
CANARY = "k8s-canary"  # the canary of lab/fleet.yml and lab/fleet-demo.yml
HELD = 100  # connections held on the canary through the rollout


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


def _relay(
    key: str, proc: subprocess.Popen[str], started: float, out: dict[str, tuple[int, float]]
) -> None:
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
        proc = subprocess.Popen(
            cmd, cwd=workdir(), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
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


@dataclass
class Held:
    """The connections held on a host through a step: `result` is inflight's, or `error`
    says why there is none."""

    host: str
    count: int
    result: dict[str, Any] | None = None
    error: str = ""

    @property
    def broken(self) -> int:
        return int((self.result or {}).get("broken") or 0)


@contextmanager
def holding(lab: Any, host: str, count: int) -> Iterator[Held]:
    """`count` connections held open through a private IPVS service on `host` for the block
    (inflight.held); if they cannot be set up or read, the record says why and the block runs
    all the same."""
    rec = Held(host, count)
    with ExitStack() as stack:
        h = None
        try:
            h = stack.enter_context(inflight.held(lab, host, count))
            print(
                f"    holding {count} connections through a private IPVS service on {host}",
                flush=True,
            )
        except Exception as e:  # the lab or the guest, whatever failed: the demo goes on
            rec.error = f"could not be set up: {_one_line(e)}"
            print(f"    held connections on {host} {rec.error}; going on without them", flush=True)
        try:
            yield rec
        finally:
            if h is not None:
                try:
                    stack.close()  # stops the client, removes the topology
                    rec.result = h.result
                except Exception as e:
                    rec.error = f"gave no result: {_one_line(e)}"


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def held_line(h: Held, step: str = "rollout") -> str:
    """The summary line of the held connections: how many, how long, how many broke."""
    r = h.result or {}
    if h.error or "broken" not in r:
        why = h.error or f"gave no result ({r.get('error', 'none')})"
        return f"    {'held':<8} connections on {h.host} {why}"
    line = (
        f"    {'held':<8} {r.get('connections', h.count)} connections through a private "
        f"IPVS service on {h.host}, {r.get('seconds', 0):.0f} s through the {step}: "
        f"{h.broken} broke"
    )
    if h.broken:
        first = (r.get("failures") or [{}])[0]
        line += f" (first at {first.get('at', '?')} s: {first.get('error', '?')})"
    return line


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
        (
            "build",
            "Build the fix module for the lab's kernels",
            ["nice", "-n", "10", cli, "build", "--all-lab", "--out", str(artifacts)],
        ),
        (
            "rollout",
            "Roll out in canary waves (deploy, gate, next wave)",
            [
                cli,
                "rollout",
                inventory,
                "--json",
                str(reports / "rollout.json"),
                "--journal",
                str(reports / "rollout.jsonl"),
            ],
        ),
        (
            "check",
            "Compliance checks",
            [
                cli,
                "check",
                inventory,
                "--junitxml",
                str(reports / "checks.xml"),
                "--json",
                str(reports / "checks.json"),
                "--report",
                str(reports / "checks.md"),
            ],
        ),
        # kube-proxy's own IPVS-mode ruleset (its mark-based masquerade), a NodePort from an
        # outside client: where the 1.x design failed every reused connection
        (
            "probe",
            "Reuse scenario on the canary (kube-proxy's ruleset, NodePort, knob=1)",
            [
                cli,
                "probe",
                "scenario",
                "--host",
                CANARY,
                "--ruleset",
                "kube-proxy",
                "--knob",
                "1",
                "--scenarios",
                "A=50,B=20",
                "--conntrack",
                "--json",
                str(reports / "probe.json"),
            ],
        ),
    ]
    results: dict[str, tuple[int, float]] = {}
    held: Held | None = None
    started = time.monotonic()
    for stage in stages(plan, args.skip):
        with ExitStack() as around:
            if stage[0][0] == "rollout":
                held = around.enter_context(holding(Lab(labdir), CANARY, HELD))
            if len(stage) > 1:
                results |= run_together(stage, env)
            else:
                key, title, cmd = stage[0]
                results[key] = _run(title, cmd, env)
        if any(results[k][0] != 0 for k, _, _ in stage if k in TOGETHER):
            break  # nothing after this can run
    if results.get("probe", (1, 0))[0] == 0:
        _run(
            "Latency plot",
            [cli, "probe", "plot", str(reports / "probe.json"), "-o", str(reports / "probe.png")],
            env,
        )
    print("\n==> Summary")
    for key, (rc, took) in results.items():
        print(f"    {key:<8} {'ok' if rc == 0 else f'FAILED (exit {rc})':<18} {took:6.0f} s")
    print(f"    {'total':<8} {'':<18} {time.monotonic() - started:6.0f} s (wall)")
    if held is not None:
        print(held_line(held))
        (reports / "held.json").write_text(json.dumps(vars(held), indent=2) + "\n")
    _print_probe(reports / "probe.json")
    print(
        f"    reports: {reports}/ (rollout.json, checks.xml, checks.md, probe.json, probe.png"
        f"{', held.json' if held is not None else ''})"
    )
    print("    stop the lab: ipvs-fleet lab down")
    ok = all(rc == 0 for rc, _ in results.values()) and not (held and held.broken)
    return 0 if ok else 1


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
