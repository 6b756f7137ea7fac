"""Rollout on the 3-VM lab: the canary wave first and its gate; a canary that cannot meet its
gate (an impossible latency budget in its host data) halts the rollout, and every other host
is untouched, as the hosts themselves show (their IPVS files, modules and sysctls are the same,
down to each file's change time, before and after).

Cost: one canary deploy, one gate (the checks with the latency probe) and one rollback on the
bookworm VM; the other two hosts are only read.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.lab import FINGERPRINT

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("ipvs-fleet")
pytestmark = [pytest.mark.lab, pytest.mark.destructive]


def fingerprint(lab, host: str) -> str:  # type: ignore[no-untyped-def]
    return str(lab.run(host, FINGERPRINT).stdout)


def test_impossible_canary_budget_halts_and_others_stay_untouched(lab, artifacts, tmp_path):  # type: ignore[no-untyped-def]
    canary = next(n for n, h in lab.hosts.items() if "canary" in h.groups)
    others = [n for n in lab.hosts if n != canary]
    before = {h: fingerprint(lab, h) for h in others}
    # The canary's host data gets a budget no host can meet (p99 of 0 ms).
    inv = tmp_path / "inv.py"
    inv.write_text(
        f"exec(open({str(lab.inventory_path)!r}).read())\n"
        "for _g in [v for k, v in list(globals().items()) if isinstance(v, list)]:\n"
        "    for _i, _h in enumerate(_g):\n"
        f"        if isinstance(_h, tuple) and _h[0] == {canary!r}:\n"
        "            _g[_i] = (_h[0], {**_h[1], 'ipvs_latency_budget': {'p99_ms': 0}})\n"
    )
    env = dict(os.environ, IPVS_FLEET_LAB_DIR=str(lab.dir),
               IPVS_FLEET_ARTIFACTS=str(next(iter(artifacts.values())).path.parent))  # fmt: skip
    report = tmp_path / "report.json"
    r = subprocess.run(
        [str(CLI), "rollout", str(inv), "--waves", "canary,100%", "--journal",
         str(tmp_path / "j.jsonl"), "--json", str(report)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-4000:]
    doc = json.loads(report.read_text())
    assert doc["outcome"] == "halted"
    assert doc["halted_at_wave"] == 1
    assert doc["plan"][0]["hosts"] == [canary]
    assert sorted(doc["plan"][1]["hosts"]) == sorted(others)
    assert len(doc["waves"]) == 1  # wave 2 never started
    assert doc["hosts"][canary]["state"] == "rolled-back"
    assert "latency" in doc["hosts"][canary]["detail"]
    for h in others:
        assert doc["hosts"][h]["state"] == "old"
        assert fingerprint(lab, h) == before[h], f"{h} was touched"
    # The canary itself is back on the stock set; the lab image has no fleet sysctl file, so
    # the rollback removed the one the deploy wrote.
    assert lab.run(canary, "test ! -e /lib/modules/$(uname -r)/updates/ipvs-fleet && "
                           "test ! -e /etc/sysctl.d/90-ipvs-fleet.conf", check=False).ok
