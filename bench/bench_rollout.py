"""Benchmark: `ipvs-fleet rollout` of the simulated fleet (50 hosts, waves 1,10%,50%,100%).

    IPVS_FLEET_SIM_DIR=.simfleet IPVS_FLEET_ARTIFACTS=artifacts \\
        .venv/bin/python bench/bench_rollout.py [--hosts 50] [--no-ansible] [--no-gate-run]

All runs in one process, on the same hosts, each from a reset fleet (no deploy, stock trees):
1. baseline: one plain `pyinfra -y INV deploy.py` over all hosts (no waves, no gate);
2. the rollout with the simulated fleet's policy (simfleet/rollout.yml: every check on every
   host, the latency probe on one host per wave): wall time, and per wave its deploy and gate
   seconds; overhead = rollout wall time minus the deploys and gates;
3. the rollout with the gate off (pyinfra verification only, `gate.checks: false`): what the
   waves alone cost over the baseline;
4. `ansible-playbook site.yml` on the same hosts with the same serial list (site.yml's plays
   with `serial` replaced, written next to the fleet: site.yml has no serial override).
Ratios are printed against the baseline, and ansible-playbook's against each rollout (run 3
is the like-for-like one: site.yml verifies too, without a testinfra gate). --memory sizes
the fleet VM. BENCH_KEEP=1 leaves the fleet running.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from ipvs_fleet.simfleet.fleet import ROLLOUT_CONFIG, SimFleet

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAVES = "1,10%,50%,100%"
SITE = "ansible_collections/ipvs_fleet/fleet/playbooks/site.yml"
SERIAL: list[int | str] = [1, "10%", "50%", "100%"]


def timed(cmd: list[str], env: dict[str, str], log: Path | None = None) -> tuple[float, int, str]:
    """Run cmd; its output goes to log (watch it with tail -f) or is kept; the last 3000 chars."""
    t0 = time.monotonic()
    if log is None:
        r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        return time.monotonic() - t0, r.returncode, (r.stdout + r.stderr)[-3000:]
    with log.open("w") as f:
        rc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return time.monotonic() - t0, rc, log.read_text()[-3000:]


def fresh(sim: SimFleet, art: Path) -> None:
    """Every host back to no deploy; the shared kernel's patched ip_vs loaded again."""
    sim.reset()
    sim.kernel_modules(art)


def rollout(sim: SimFleet, env: dict[str, str], config: Path, tag: str) -> dict[str, Any]:
    journal, report = sim.dir / f"bench-{tag}.jsonl", sim.dir / f"bench-{tag}.json"
    journal.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    wall, rc, out = timed(
        [
            str(BIN / "ipvs-fleet"),
            "rollout",
            str(sim.inventory_path),
            "--config",
            str(config),
            "--waves",
            WAVES,
            "--journal",
            str(journal),
            "--json",
            str(report),
        ],
        env,
    )
    doc = json.loads(report.read_text()) if report.is_file() else {}
    if rc != 0 or not doc:
        print(f"  rollout ({tag}) failed, rc {rc}:\n{out}")
    return {"wall": wall, "rc": rc, "doc": doc}


def print_rollout(name: str, res: dict[str, Any], base: float) -> None:
    doc = res["doc"]
    print(
        f"{name}: {res['wall']:.1f} s (rc {res['rc']}), {res['wall'] / base:.2f}x the baseline; "
        f"outcome {doc.get('outcome')}, states {doc.get('counts')}"
    )
    dep_sum = gate_sum = 0.0
    for w in doc.get("waves", []):
        s = w["seconds"]
        dep, gate = s.get("deploy", 0.0), s.get("gate", 0.0)
        dep_sum, gate_sum = dep_sum + dep, gate_sum + gate
        print(
            f"  wave {w['index']} ({w['spec']}, {len(w['hosts'])} hosts): deploy {dep:.1f} s, "
            f"gate {gate:.1f} s"
        )
    n = max(1, len(doc.get("waves", [])))
    other = res["wall"] - dep_sum - gate_sum
    print(
        f"  deploys {dep_sum:.1f} s ({dep_sum / base:.2f}x the one-run baseline), gates "
        f"{gate_sum:.1f} s, controller overhead {other:.1f} s ({other / n:.1f} s per wave)"
    )


def ansible_files(sim: SimFleet) -> tuple[Path, Path]:
    """An Ansible inventory of the simulated hosts and site.yml with our serial list."""
    common = (
        f"-o UserKnownHostsFile={sim.known_hosts} -o GlobalKnownHostsFile=/dev/null "
        "-o StrictHostKeyChecking=yes -o IdentitiesOnly=yes -o BatchMode=yes"
    )
    hosts = {
        n: {"ansible_host": "127.0.0.1", "ansible_port": h["port"]}
        for n, h in sorted(sim.hosts.items(), key=lambda kv: kv[1]["index"])
    }
    first = next(iter(hosts))
    inv = {
        "all": {
            "vars": {
                "ansible_user": "root",
                "ansible_ssh_private_key_file": str(sim.key),
                "ansible_ssh_args": "-o ControlMaster=auto -o ControlPersist=300s",
                "ansible_ssh_common_args": common,
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_pipelining": True,
                "ipvs_host_class": "k8s_node",
                "ipvs_activation": "next-boot",
            },
            "children": {"canary": {"hosts": {first: None}}, "sim_hosts": {"hosts": hosts}},
        }
    }
    inv_path = sim.dir / "ansible-hosts.yml"
    inv_path.write_text(yaml.safe_dump(inv, sort_keys=False))
    # the collection's site playbook; run from the checkout (its ansible.cfg finds the role)
    plays = yaml.safe_load((REPO / SITE).read_text())
    for play in plays:
        if "serial" in play:
            play["serial"] = SERIAL
    book = sim.dir / "site-bench.yml"
    book.write_text(yaml.safe_dump(plays, sort_keys=False))
    return inv_path, book


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument(
        "--memory",
        type=int,
        default=4096,
        help="MiB for the fleet VM (50 sshd plus one Python per busy host)",
    )
    ap.add_argument("--no-ansible", action="store_true")
    ap.add_argument("--no-gate-run", action="store_true", help="skip run 3 (waves, no checks)")
    ap.add_argument(
        "--no-rollouts",
        action="store_true",
        help="skip runs 2 and 3: the baseline and ansible-playbook only",
    )
    args = ap.parse_args()
    art = Path(os.environ.get("IPVS_FLEET_ARTIFACTS", REPO / "artifacts"))
    sim = SimFleet()
    t0 = time.monotonic()
    sim.up(args.hosts, memory_mb=args.memory)
    print(
        f"simulated fleet of {args.hosts} hosts ({args.memory} MiB) up in "
        f"{time.monotonic() - t0:.0f} s",
        flush=True,
    )
    env = dict(
        os.environ,
        IPVS_FLEET_SIM_DIR=str(sim.dir),
        IPVS_FLEET_ARTIFACTS=str(art),
        ANSIBLE_NOCOLOR="1",
    )
    try:
        fresh(sim, art)
        base, rc, out = timed(
            [str(BIN / "pyinfra"), "-y", str(sim.inventory_path), "deploy.py"], env
        )
        print(
            f"baseline: pyinfra deploy.py over {args.hosts} hosts in one run: {base:.1f} s "
            f"(rc {rc})",
            flush=True,
        )
        if rc:
            print(out)
        walls: dict[str, float] = {}
        if not args.no_rollouts:
            fresh(sim, art)
            res = rollout(sim, env, ROLLOUT_CONFIG, "checks")
            print_rollout(f"rollout {WAVES}, gate = checks", res, base)
            if res["rc"] == 0:
                walls["the rollout with the checks gate"] = res["wall"]
        if not args.no_gate_run and not args.no_rollouts:
            cfg = yaml.safe_load(ROLLOUT_CONFIG.read_text())
            cfg["gate"] = {"checks": False}
            nogate = sim.dir / "rollout-nogate.yml"
            nogate.write_text(yaml.safe_dump(cfg))
            fresh(sim, art)
            res = rollout(sim, env, nogate, "verify")
            print_rollout(f"rollout {WAVES}, gate = pyinfra verification", res, base)
            if res["rc"] == 0:
                # site.yml verifies each host's build and values too, no testinfra gate:
                # the like-for-like comparison with ansible-playbook.
                walls["the rollout with the verification gate"] = res["wall"]
        if not args.no_ansible:
            inv, book = ansible_files(sim)
            fresh(sim, art)
            # 50 sshd behind one saturated TCG VM answer a burst of connects late: the same
            # patience pyinfra gets (sim inventory: connect retries), not Ansible's 10 s.
            aenv = dict(
                env,
                ANSIBLE_COLLECTIONS_PATH=str(REPO),
                ANSIBLE_TIMEOUT="60",
                ANSIBLE_SSH_RETRIES="3",
            )
            a, arc, aout = timed(
                [str(BIN / "ansible-playbook"), "-i", str(inv), str(book), "-f", str(args.hosts)],
                aenv,
                sim.dir / "bench-ansible.log",
            )
            print(
                f"ansible-playbook site.yml, serial {SERIAL}, forks {args.hosts}: {a:.1f} s "
                f"(rc {arc}), {a / base:.2f}x the baseline"
            )
            if arc:
                print(aout)
                print(f"  ansible-playbook failed (rc {arc}): no ratio")
            else:
                for name, wall in walls.items():
                    print(f"  ansible-playbook / {name}: {a / wall:.2f}x")
            counts = sim.install_counts()
            print(f"  installs per host after ansible: {sorted(set(counts.values()))}")
    finally:
        if os.environ.get("BENCH_KEEP") != "1":
            sim.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
