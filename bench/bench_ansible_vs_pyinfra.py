"""pyinfra deploy vs ansible-playbook doing the same work on the same lab hosts, one run.

    IPVS_FLEET_LAB_DIR=.lab IPVS_FLEET_ARTIFACTS=artifacts .venv/bin/python \\
        bench/bench_ansible_vs_pyinfra.py [--limit HOST_OR_GROUP] [--rounds N]

Each round, for each engine: the pyinfra rollback puts the hosts back to stock (not timed),
the engine converges them from stock (timed), then runs again with nothing to do (timed).
Prints the wall times and the ansible/pyinfra ratio; exit 1 if a run failed or a no-op run
changed something.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(REPO / "src"))

from ipvs_fleet.ansible_inventory import write_lab_inventory  # noqa: E402
from ipvs_fleet.lab import Lab  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    took = time.monotonic() - t0
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{(r.stdout + r.stderr)[-3000:]}")
    return took, r.stdout + r.stderr


def ansible_changed(out: str) -> int:
    return sum(int(n) for n in re.findall(r"^\S+\s+:\s+ok=\d+\s+changed=(\d+)", out, re.M))


def pyinfra_changed(out: str) -> int:
    # columns: operations, hosts, success (changed something), error, no change; "-" = 0
    m = re.search(r"Grand total\s+(\S+)\s+(\S+)\s+(\S+)", out)
    return int(m.group(3).replace("-", "0")) if m else -1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--limit", help="hosts or groups (both engines)")
    p.add_argument("--rounds", type=int, default=1)
    args = p.parse_args()
    lab = Lab()
    if not lab.hosts:
        sys.exit(f"lab {lab.dir} is not up (ipvs-fleet lab up)")
    env = dict(os.environ, IPVS_FLEET_LAB_DIR=str(lab.dir), ANSIBLE_NOCOLOR="1")
    inv = write_lab_inventory(lab, Path(tempfile.mkdtemp()) / "lab.ansible.yml")
    limit = ["--limit", args.limit] if args.limit else []
    pyinfra = [str(BIN / "pyinfra"), "-y", *limit, str(REPO / "inventory" / "lab.py")]
    ansible = [str(BIN / "ansible-playbook"), "-i", str(inv), *limit, "ipvs_fleet.fleet.site"]
    rollback = [*pyinfra, "deploy/rollback.py"]
    times: dict[str, list[float]] = {}
    bad = []
    for _ in range(args.rounds):
        for engine, cmd, changed in (
            ("pyinfra", [*pyinfra, "deploy.py"], pyinfra_changed),
            ("ansible", ansible, ansible_changed),
        ):
            timed(rollback, env)
            took, _out = timed(cmd, env)
            times.setdefault(f"{engine} converge from stock", []).append(took)
            took, out = timed(cmd, env)
            times.setdefault(f"{engine} no-op", []).append(took)
            if changed(out) != 0:
                bad.append(f"{engine} no-op run changed {changed(out)}")
    hosts = ", ".join(sorted(lab.hosts)) + (f" (limit {args.limit})" if args.limit else "")
    print(f"hosts: {hosts}; rounds: {args.rounds}; load average {os.getloadavg()[0]:.1f}")
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print(f"{k:<32} {v:7.1f} s")
    for what in ("converge from stock", "no-op"):
        ratio = best[f"ansible {what}"] / best[f"pyinfra {what}"]
        print(f"ratio ansible/pyinfra, {what}: {ratio:.1f}x")
    for b in bad:
        print(f"FAIL: {b}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
