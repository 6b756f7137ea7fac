"""Ansible inventories for ipvs-fleet: the lab's, generated; any, read by the pyinfra path.

>>> write_lab_inventory(Lab())              # inventory/lab.ansible.yml for the running lab
>>> groups = pyinfra_groups("inventory/lab.ansible.yml")
>>> groups["k8s_nodes"]
[('k8s-canary', {'ssh_hostname': '127.0.0.1', 'ssh_port': 40123, ..., 'ipvs_host_class': ...})]

`inventory/from_ansible.py` is a pyinfra inventory that reads the Ansible inventory named by
$IPVS_FLEET_ANSIBLE_INVENTORY, so `pyinfra inventory/from_ansible.py deploy.py` and
`ipvs-fleet check inventory/from_ansible.py` work from an Ansible inventory.

Command line (run with the project's venv python):

    python -m ipvs_fleet.ansible_inventory lab [--lab-dir DIR] [--out FILE]
    python -m ipvs_fleet.ansible_inventory pyinfra INVENTORY     # JSON, for a look (passwords ***)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ipvs_fleet.errors import ConfigError, FleetError
from ipvs_fleet.lab.inventory import lab_class_data, lab_group_data
from ipvs_fleet.redact import mask_assignments, masked_data
from ipvs_fleet.resources import workdir

if TYPE_CHECKING:
    from ipvs_fleet.lab.lab import Lab

LAB_INVENTORY = workdir() / "inventory" / "lab.ansible.yml"
ENV_VAR = "IPVS_FLEET_ANSIBLE_INVENTORY"
# Ansible connection variables -> pyinfra ssh connector data. Other `ansible_*` variables
# (python interpreter, pipelining, ...) mean nothing to pyinfra and are dropped.
CONNECTION_VARS = {
    "ansible_host": "ssh_hostname",
    "ansible_port": "ssh_port",
    "ansible_user": "ssh_user",
    "ansible_ssh_private_key_file": "ssh_key",
    "ansible_password": "ssh_password",
    # privilege escalation (only sudo, Ansible's default become_method, maps)
    "ansible_become": "_sudo",
    "ansible_become_user": "_sudo_user",
    "ansible_become_password": "_sudo_password",
}
# `-o Option=value` of ansible_ssh_common_args / ansible_ssh_extra_args pyinfra understands.
SSH_OPTIONS = {
    "userknownhostsfile": "ssh_known_hosts_file",
    "stricthostkeychecking": "ssh_strict_host_key_checking",
}


def ansible_inventory_bin() -> str:
    """`ansible-inventory` next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).with_name("ansible-inventory")
    found = str(here) if here.exists() else shutil.which("ansible-inventory")
    if found is None:
        raise ConfigError(
            "ansible-inventory not found: reading an Ansible inventory needs ansible-core "
            "(pip install 'ipvs-fleet[ansible]')"
        )
    return found


def lab_inventory(lab: Lab, user: str = "root") -> dict[str, Any]:
    """The lab's hosts as an Ansible YAML inventory document (groups, connection, classes),
    as root or as a non-root `user` with `become` (sudo)."""
    hosts = lab.hosts
    if not hosts:
        raise FleetError(f"lab {lab.dir} has no hosts (run: ipvs-fleet lab up)")
    common = " ".join(
        [
            f"-o UserKnownHostsFile={shlex.quote(str(lab.known_hosts))}",
            "-o GlobalKnownHostsFile=/dev/null",
            "-o StrictHostKeyChecking=yes",
            "-o IdentitiesOnly=yes",
            "-o BatchMode=yes",
            "-o ServerAliveInterval=5",
            "-o ServerAliveCountMax=6",
        ]
    )
    children: dict[str, dict[str, Any]] = {}
    seen: set[str] = set()
    class_data = lab_class_data()
    for name, h in sorted(hosts.items()):
        for group in h.groups:
            entry = children.setdefault(group, {"hosts": {}})
            if group in lab_group_data():
                entry["vars"] = lab_group_data()[group]
            # A host's variables go with its first group only; Ansible merges the rest.
            if name in seen:
                entry["hosts"][name] = None
                continue
            seen.add(name)
            entry["hosts"][name] = {
                "ansible_host": "127.0.0.1",
                "ansible_port": h.port,
                "ipvs_host_class": h.host_class,
                **class_data.get(h.host_class, {}),
            }
    return {
        "all": {
            "vars": {
                "ansible_user": user,
                **({"ansible_become": True} if user != "root" else {}),
                "ansible_ssh_private_key_file": str(lab.client_key),
                # Replaces Ansible's default ssh_args: one multiplexed connection per host,
                # kept for the next run (ssh takes the first value of a repeated -o).
                "ansible_ssh_args": "-o ControlMaster=auto -o ControlPersist=300s",
                "ansible_ssh_common_args": common,
                "ansible_python_interpreter": "/usr/bin/python3",
                "ansible_pipelining": True,
            },
            "children": children,
        }
    }


def write_lab_inventory(lab: Lab, path: Path | str = LAB_INVENTORY, user: str = "root") -> Path:
    """Write the lab's Ansible inventory (default inventory/lab.ansible.yml); return its path."""
    doc = lab_inventory(lab, user)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"# Written by `python -m ipvs_fleet.ansible_inventory lab` from {lab.state_path};\n"
        "# regenerate it after every `ipvs-fleet lab up` (SSH ports change).\n"
    )
    tmp = out.with_suffix(".tmp")
    body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False, width=1000)
    tmp.write_text(head + body)
    tmp.replace(out)
    return out


def ansible_list(inventory: Path | str) -> dict[str, Any]:
    """`ansible-inventory -i INVENTORY --list` as a dict (ConfigError naming the file)."""
    inv = Path(inventory)
    if not inv.exists():
        raise ConfigError(f"{inv}: Ansible inventory not found")
    r = subprocess.run(
        [ansible_inventory_bin(), "-i", str(inv), "--list"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        # a file no plugin can parse is an error, not a warning and an empty inventory
        env={**os.environ, "ANSIBLE_INVENTORY_UNPARSED_FAILED": "true"},
    )
    if r.returncode != 0:
        # the first plugin's complaint names the line; the later ones repeat it
        why = mask_assignments(r.stderr.strip())[:1200]
        raise ConfigError(f"{inv}: ansible-inventory failed: {why}")
    try:
        doc: dict[str, Any] = json.loads(r.stdout)
    except ValueError as e:
        raise ConfigError(f"{inv}: ansible-inventory printed no JSON: {e}") from e
    return doc


def group_members(doc: dict[str, Any]) -> dict[str, list[str]]:
    """Group -> its hosts, children's hosts included, in `--list` order."""

    def members(group: str, path: tuple[str, ...] = ()) -> list[str]:
        body = doc.get(group) or {}
        out = list(body.get("hosts", []))
        for child in body.get("children", []):
            if child not in path:  # Ansible forbids cycles; be safe anyway
                out += [h for h in members(child, (*path, group)) if h not in out]
        return out

    return {g: members(g) for g in doc if g != "_meta"}


def pyinfra_data(hostvars: dict[str, Any]) -> dict[str, Any]:
    """One host's Ansible variables as pyinfra host data (connection mapped, rest kept)."""
    data: dict[str, Any] = {}
    for key, value in hostvars.items():
        if key == "ansible_become_method" and str(value) != "sudo":
            raise ConfigError(f"ansible_become_method {value!r}: only sudo is supported")
        if key in CONNECTION_VARS:
            data[CONNECTION_VARS[key]] = value
        elif key in ("ansible_ssh_common_args", "ansible_ssh_extra_args"):
            data.update(ssh_options(str(value)))
        elif not key.startswith("ansible_"):
            data[key] = value
    if "ssh_port" in data:
        data["ssh_port"] = int(data["ssh_port"])
    return data


def ssh_options(args: str) -> dict[str, Any]:
    """pyinfra data for the `-o Key=Value` options of an ssh argument string it understands."""
    words = shlex.split(args)
    out: dict[str, Any] = {}
    for i, w in enumerate(words):
        opt = None
        if w == "-o" and i + 1 < len(words):
            opt = words[i + 1]
        elif w.startswith("-o") and len(w) > 2:
            opt = w[2:]
        if opt and "=" in opt:
            key, value = opt.split("=", 1)
            if key.strip().lower() in SSH_OPTIONS:
                out[SSH_OPTIONS[key.strip().lower()]] = value.strip()
    return out


def pyinfra_groups(inventory: Path | str) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """An Ansible inventory as pyinfra inventory groups: {group: [(host, data), ...]}.

    Every group with hosts is kept (`all` too, which carries every host's data);
    `ungrouped` and empty groups are left out. Host data is Ansible's merged host
    variables (group_vars included), with the connection mapped to pyinfra's ssh_* keys.
    """
    doc = ansible_list(inventory)
    hostvars = doc.get("_meta", {}).get("hostvars", {})
    members = group_members(doc)
    hosts = members.get("all", [])
    if not hosts:
        raise ConfigError(f"{inventory}: Ansible inventory has no hosts")
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {
        "all": [(h, pyinfra_data(hostvars.get(h, {}))) for h in hosts]
    }
    for group, names in members.items():
        if group not in ("all", "ungrouped") and names:
            groups[group] = [(h, {}) for h in names]
    return groups


def _cli(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ipvs_fleet.ansible_inventory")
    sub = p.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("lab", help="write the running lab's Ansible inventory")
    lab.add_argument("--lab-dir", type=Path, help="lab dir (default: $IPVS_FLEET_LAB_DIR or .lab)")
    lab.add_argument("--out", type=Path, default=LAB_INVENTORY, help="inventory file to write")
    show = sub.add_parser(
        "pyinfra", help="print an Ansible inventory as pyinfra groups (JSON, passwords ***)"
    )
    show.add_argument("inventory", type=Path)
    args = p.parse_args(argv)
    try:
        if args.cmd == "lab":
            from ipvs_fleet.lab.lab import Lab

            print(write_lab_inventory(Lab(args.lab_dir), args.out))
        else:
            print(json.dumps(masked_data(pyinfra_groups(args.inventory)), indent=2))
    except FleetError as e:
        print(f"ipvs-fleet: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
