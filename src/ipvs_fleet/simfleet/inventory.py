"""pyinfra inventory of the simulated fleet: `pyinfra src/ipvs_fleet/simfleet/inventory.py ...`.

Reads the fleet's state.json in $IPVS_FLEET_SIM_DIR (default ./.simfleet, as
ipvs_fleet.simfleet.fleet). Optional
`hostdata.json` there ({host: {key: value}}) adds host data, e.g. a fault for one host.
Every host is in group `sim_hosts`; the first is also in `canary`. The rollout policy for this
fleet (one latency probe per wave) is `rollout.yml` next to this file.
"""

import json
import os
from pathlib import Path

from ipvs_fleet.lab.inventory import lab_class_data

_dir = Path(os.environ.get("IPVS_FLEET_SIM_DIR", Path.cwd() / ".simfleet"))
_state = json.loads((_dir / "state.json").read_text())
_extra_path = _dir / "hostdata.json"
_extra = json.loads(_extra_path.read_text()) if _extra_path.is_file() else {}
_CLASS = "k8s_node"  # every simulated host's
_lab_budget = lab_class_data().get(_CLASS, {})  # one policy read, not one per host


def _host(name: str, h: dict) -> tuple[str, dict]:
    data = {
        "ssh_hostname": "127.0.0.1",
        "ssh_port": h["port"],
        "ssh_user": "root",
        "ssh_key": str(_dir / "ssh" / "id_ed25519"),
        "ssh_known_hosts_file": str(_dir / "ssh" / "known_hosts"),
        "ssh_strict_host_key_checking": "yes",
        # 50 sshds behind one saturated TCG VM answer a burst of connects late (pyinfra's
        # connect timeout is 10 s): try again rather than fail a host the fault tests did not
        # break.
        "ssh_connect_retries": 2,
        "ipvs_host_class": _CLASS,
        # One kernel for all simulated hosts: the running modules are never swapped per host.
        "ipvs_activation": "next-boot",
        # All hosts share one TCG VM's CPU, so a probe's p99 measures CPU contention, not the
        # network: the lab's budget (p99 raised, no slow connect and no failure still).
        **_lab_budget,
    }
    data.update(_extra.get(name, {}))
    return name, data


_names = sorted(_state["hosts"], key=lambda n: _state["hosts"][n]["index"])
sim_hosts = [_host(n, _state["hosts"][n]) for n in _names]
canary = sim_hosts[:1]
