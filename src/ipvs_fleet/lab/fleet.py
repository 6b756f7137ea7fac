"""The lab fleet file (`lab/fleet.yml`): which VMs the lab boots, validated before anything runs.

>>> fleet = load_fleet(Path("lab/fleet.yml"))
>>> fleet.hosts["k8s-canary"].groups
('k8s_nodes', 'canary')
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ipvs_fleet.debian import RELEASES, check_release
from ipvs_fleet.errors import ConfigError, load_yaml_file
from ipvs_fleet.resources import data_path, policy_file

DEFAULT_FLEET = data_path("lab/fleet.yml")

HOST_FIELDS = {
    "release",
    "host_class",
    "groups",
    "memory_mb",
    "kernel_args",
    "build_tools",
    "packages",
    "lan_address",
    "provision",
    "lab_only",
}
# A Debian package name (Debian Policy 5.6.1).
PACKAGE_RE = re.compile(r"[a-z0-9][a-z0-9+.-]+")
# Extra kernel command-line words, e.g. `lockdown=integrity`: letters, digits and ._,=-
KARG_RE = re.compile(r"[A-Za-z0-9_.,=-]+")
TOP_FIELDS = {"hosts", "class_groups"}
# A host name is also its hostname, an ssh_config Host and an inventory name.
NAME_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
GROUP_RE = re.compile(r"[a-z_][a-z0-9_]*")


@dataclass(frozen=True)
class FleetHost:
    """One lab VM as the fleet file describes it."""

    name: str
    release: str  # Debian codename
    host_class: str  # key of host_classes
    groups: tuple[str, ...]  # inventory groups, the class group first
    memory_mb: int = 1024
    kernel_args: tuple[str, ...] = ()  # appended to the VM's kernel command line
    build_tools: bool = False  # image carries dkms, a compiler, the kernel's headers and source
    packages: tuple[str, ...] = ()  # Debian packages its image carries besides LAB_PACKAGES
    # an address on the lab's own Ethernet segment (a second NIC, eth1), e.g. "10.0.9.11/24"
    lan_address: str = ""
    provision: Path | None = None  # a shell script run as root after each boot
    lab_only: bool = False  # serves the others (clients, real servers): in no inventory


@dataclass(frozen=True)
class Fleet:
    path: Path
    hosts: dict[str, FleetHost]
    class_groups: dict[str, str]  # host class -> inventory group

    def group_of(self, host_class: str) -> str:
        return self.class_groups.get(host_class, f"{host_class}_hosts")

    def all_groups(self) -> list[str]:
        """Every group: one per known class (even if empty), then the extra groups."""
        out = [self.group_of(c) for c in self.class_groups]
        for h in self.hosts.values():
            out += [g for g in h.groups if g not in out]
        return out

    def releases(self) -> list[str]:
        """The Debian releases its hosts boot, each once, in kernel/releases.yml's order."""
        booted = {h.release for h in self.hosts.values()}
        return [r for r in RELEASES if r in booted]


def fleet_path() -> Path:
    return Path(os.environ.get("IPVS_FLEET_FLEET", DEFAULT_FLEET))


def host_class_names(path: Path | None = None) -> set[str]:
    """The host classes the policy defines (keys of `host_classes`)."""
    path = path or policy_file()
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read host classes: {e}") from e
    classes = data.get("host_classes") if isinstance(data, dict) else None
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{path}: host_classes: missing or not a mapping")
    return set(classes)


def load_fleet(path: Path | None = None, classes: set[str] | None = None) -> Fleet:
    """Read and validate a fleet file; every error names the file and the field."""
    path = path or fleet_path()
    classes = host_class_names() if classes is None else classes
    data = load_yaml_file(path, "fleet file")

    def err(field: str, msg: str) -> ConfigError:
        return ConfigError(f"{path}: {field}: {msg}")

    if not isinstance(data, dict):
        raise err("(top level)", "must be a mapping with a `hosts` key")
    for key in data:
        if key not in TOP_FIELDS:
            raise err(str(key), f"unknown field (known: {', '.join(sorted(TOP_FIELDS))})")
    class_groups = data.get("class_groups") or {}
    if not isinstance(class_groups, dict):
        raise err("class_groups", "must be a mapping of host class to group name")
    for cls, group in class_groups.items():
        if cls not in classes:
            raise err(f"class_groups.{cls}", _unknown_class(cls, classes))
        if not isinstance(group, str) or not GROUP_RE.fullmatch(group):
            raise err(f"class_groups.{cls}", f"{group!r} is not a valid group name")
    hosts_data = data.get("hosts")
    if not isinstance(hosts_data, dict) or not hosts_data:
        raise err("hosts", "missing, empty or not a mapping of host name to host")
    hosts: dict[str, FleetHost] = {}
    for name, spec in hosts_data.items():
        field = f"hosts.{name}"
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise err(field, "host name must be lower-case letters, digits and '-'")
        if not isinstance(spec, dict):
            raise err(field, "must be a mapping with release and host_class")
        for key in spec:
            if key not in HOST_FIELDS:
                known = ", ".join(sorted(HOST_FIELDS))
                raise err(f"{field}.{key}", f"unknown field (known: {known})")
        lab_only = spec.get("lab_only", False)
        if not isinstance(lab_only, bool):
            raise err(f"{field}.lab_only", f"must be true or false, not {lab_only!r}")
        if lab_only and "host_class" in spec:
            raise err(f"{field}.host_class", "a lab_only host is in no inventory: no class")
        for key in ("release",) if lab_only else ("release", "host_class"):
            if key not in spec:
                raise err(f"{field}.{key}", "missing")
            if not isinstance(spec[key], str):
                raise err(f"{field}.{key}", f"must be a string, not {spec[key]!r}")
        check_release(spec["release"], where=f"{path}: {field}.release")
        cls = spec.get("host_class", "")
        if not lab_only and cls not in classes:
            raise err(f"{field}.host_class", _unknown_class(cls, classes))
        lan = spec.get("lan_address", "")
        if lan != "":
            try:
                iface = ipaddress.ip_interface(lan)
            except ValueError:
                iface = None
            if iface is None or iface.version != 4 or "/" not in str(lan):
                raise err(f"{field}.lan_address", f"must be an IPv4 address/prefix, not {lan!r}")
        provision = spec.get("provision")
        script: Path | None = None
        if provision is not None:
            script = path.parent / str(provision)
            if not isinstance(provision, str) or not script.is_file():
                raise err(f"{field}.provision", f"no script {script}")
        extra = spec.get("groups") or []
        if not isinstance(extra, list) or not all(
            isinstance(g, str) and GROUP_RE.fullmatch(g) for g in extra
        ):
            raise err(f"{field}.groups", "must be a list of group names ([a-z_][a-z0-9_]*)")
        memory = spec.get("memory_mb", 1024)
        if not isinstance(memory, int) or isinstance(memory, bool) or not 256 <= memory <= 16384:
            raise err(f"{field}.memory_mb", f"must be an integer 256..16384, not {memory!r}")
        kargs = spec.get("kernel_args") or []
        if not isinstance(kargs, list) or not all(
            isinstance(a, str) and KARG_RE.fullmatch(a) for a in kargs
        ):
            raise err(f"{field}.kernel_args", "must be a list of words like lockdown=integrity")
        tools = spec.get("build_tools", False)
        if not isinstance(tools, bool):
            raise err(f"{field}.build_tools", f"must be true or false, not {tools!r}")
        pkgs = spec.get("packages") or []
        if not isinstance(pkgs, list) or not all(
            isinstance(p, str) and PACKAGE_RE.fullmatch(p) for p in pkgs
        ):
            raise err(f"{field}.packages", "must be a list of Debian package names")
        group = class_groups.get(cls, f"{cls}_hosts")
        groups = () if lab_only else (group, *[g for g in extra if g != group])
        hosts[name] = FleetHost(
            name,
            spec["release"],
            cls,
            groups,
            memory,
            tuple(kargs),
            tools,
            tuple(sorted(pkgs)),
            str(lan),
            script,
            lab_only,
        )
    return Fleet(path, hosts, dict(class_groups))


def _unknown_class(cls: Any, classes: set[str]) -> str:
    return f"unknown host class {cls!r} (known: {', '.join(sorted(classes))}; see {policy_file()})"
