"""Benchmark: `ipvs-fleet rollout` of the simulated fleet (50 hosts, waves 1,10%,50%,100%).

    IPVS_FLEET_ARTIFACTS=artifacts .venv/bin/python bench/bench_rollout.py [--hosts 50]
        [--ansible]

Prints, from one process: the baseline (one plain `pyinfra -y deploy.py` over all hosts, no
waves, no gate), the rollout's wall time, each wave's deploy / gate / overhead seconds
(overhead = wave wall time minus deploy and gate), and the ratios against the baseline.
With --ansible, the same waves through `ansible-playbook site.yml` (serial list passed as an
extra var) on the same hosts; the playbook must accept `-e ipvs_fleet_serial=[...]` (hook:
see ansible_rollout below).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ipvs_fleet.simfleet.fleet import SimFleet

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WAVES = "1,10%,50%,100%"


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    return time.monotonic() - t0, r.returncode, r.stderr[-2000:]


def ansible_rollout(sim: SimFleet, env: dict[str, str]) -> tuple[float, int, str] | None:
    """The same waves through ansible-playbook on the same hosts, or None without site.yml."""
    if not (REPO / "site.yml").is_file():
        return None
    inv = sim.dir / "ansible-hosts.ini"
    lines = ["[canary]", "sim-01", "", "[sim_hosts]"]
    for n, h in sorted(sim.hosts.items()):
        lines.append(f"{n} ansible_host=127.0.0.1 ansible_port={h['port']} ansible_user=root "
                     f"ansible_ssh_private_key_file={sim.key} ipvs_host_class=k8s_node "
                     "ipvs_activation=next-boot")  # fmt: skip
    lines += ["", "[all:vars]",
              f"ansible_ssh_common_args='-o UserKnownHostsFile={sim.known_hosts}'"]  # fmt: skip
    inv.write_text("\n".join(lines) + "\n")
    serial = json.dumps([1, "10%", "50%", "100%"])
    return timed([str(BIN / "ansible-playbook"), "-i", str(inv), "site.yml",
                  "-e", f"ipvs_fleet_serial={serial}", "-f", "25"], env)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hosts", type=int, default=50)
    ap.add_argument("--ansible", action="store_true")
    args = ap.parse_args()
    sim = SimFleet()
    t0 = time.monotonic()
    sim.up(args.hosts)
    print(f"simulated fleet of {args.hosts} hosts up in {time.monotonic() - t0:.0f} s")
    env = dict(os.environ, IPVS_FLEET_SIM_DIR=str(sim.dir))
    sim.reset()
    sim.kernel_modules(Path(env.get("IPVS_FLEET_ARTIFACTS", REPO / "artifacts")))
    base, rc, err = timed([str(BIN / "pyinfra"), "-y", str(sim.inventory_path), "deploy.py"], env)
    print(f"baseline: pyinfra deploy.py over {args.hosts} hosts in one run: {base:.1f} s (rc {rc})")
    sim.reset()
    sim.kernel_modules(Path(env.get("IPVS_FLEET_ARTIFACTS", REPO / "artifacts")))
    journal, report = sim.dir / "bench.jsonl", sim.dir / "bench.json"
    journal.unlink(missing_ok=True)
    wall, rc, err = timed([str(BIN / "ipvs-fleet"), "rollout", str(sim.inventory_path),
                           "--waves", WAVES, "--journal", str(journal), "--json", str(report)],
                          env)  # fmt: skip
    print(f"rollout {WAVES}: {wall:.1f} s (rc {rc}), {wall / base:.2f}x the baseline")
    if report.is_file():
        doc = json.loads(report.read_text())
        print(f"outcome {doc['outcome']}, states {doc['counts']}")
        for w in doc["waves"]:
            s = w["seconds"]
            dep, gate = s.get("deploy", 0), s.get("gate", 0)
            total = sum(s.values())
            print(f"  wave {w['index']} ({w['spec']}, {len(w['hosts'])} hosts): "
                  f"deploy {dep:.1f} s, "
                  f"gate {gate:.1f} s, other {total - dep - gate:.1f} s")
    else:
        print(err)
    if args.ansible:
        sim.reset()
        sim.kernel_modules(Path(env.get("IPVS_FLEET_ARTIFACTS", REPO / "artifacts")))
        res = ansible_rollout(sim, env)
        if res is None:
            print("ansible: no site.yml in the checkout; skipped (hook: ansible_rollout)")
        else:
            a, arc, aerr = res
            print(f"ansible-playbook site.yml, same serial: {a:.1f} s (rc {arc}); "
                  f"rollout/ansible = {wall / a:.2f}")
            if arc:
                print(aerr)
    if os.environ.get("BENCH_KEEP") != "1":
        sim.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
