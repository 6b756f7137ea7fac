"""Preflight: decide, before any host is changed, what each host gets, or refuse the whole run.

pyinfra loads the deploy file for every host before it executes any operation, and an
exception raised while loading aborts the run for all hosts. So everything that can make a
host's deploy invalid (policy, missing artifact, lockdown, the reuse interlock) is checked
here, at load time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyinfra.api.exceptions import PyinfraError
from pyinfra.api.host import Host
from pyinfra.facts.server import KernelVersion

from ipvs_fleet.build.artifact import load_artifact
from ipvs_fleet.deploy.facts import IpvsUsage, Lockdown, refuses_unsigned
from ipvs_fleet.errors import FleetError
from ipvs_fleet.policy import KNOB, REPO, HostSettings, load_policy

ARTIFACTS = Path(os.environ.get("IPVS_FLEET_ARTIFACTS", REPO / "artifacts"))
CONSISTENT = "consistent"


class DeployRefused(PyinfraError):
    """A host cannot be deployed as asked; nothing has been changed on any host."""


@dataclass(frozen=True)
class HostPlan:
    """What one host gets: its settings and the verified artifact for its kernel."""

    host: str
    settings: HostSettings
    kernel_release: str
    tarball: str
    tarball_sha256: str
    modules: dict[str, str]
    patchset: str
    reuse: str
    usage: dict[str, Any]


def host_data(host: Host) -> dict[str, Any]:
    """The ipvs_* keys of a host's merged host/group data."""
    return {k: v for k, v in host.data.dict().items() if str(k).startswith("ipvs_")}


def settings_for(host: Host) -> HostSettings:
    try:
        return load_policy().for_host(host.name, host_data(host))
    except FleetError as e:
        raise DeployRefused(str(e)) from None


def interlock(settings: HostSettings, usage: dict[str, Any], reuse: str) -> str | None:
    """Why knob=1 must not be set on this host, or None."""
    if settings.knob != 1:
        return None
    for what in ("ftp", "connmark"):
        if usage[what] and not settings.allow_reuse_with:
            return (
                f"{KNOB}=1 refused: host uses {what} ({usage[what + '_reason']}); "
                f"set host data ipvs_allow_reuse_with to a reason to override, or give it "
                f"the '{what}' class"
            )
    if usage["invalid_drop"] and reuse != CONSISTENT:
        return (
            f"{KNOB}=1 refused: an INVALID-drop rule is present and this kernel's module "
            f"reuse is '{reuse}', not conntrack-consistent"
        )
    return None


def decide(
    name: str,
    data: dict[str, Any],
    kernel_release: str,
    lockdown: dict[str, Any],
    usage: dict[str, Any],
    artifacts_dir: Path | None = None,
    policy_file: Path | str | None = None,
) -> HostPlan:
    """The plan for one host from its data and facts, or FleetError naming host and reason.

    Shared by the pyinfra preflight and the Ansible role's filter, so both engines refuse
    and decide alike.
    """
    settings = load_policy(policy_file).for_host(name, data)
    where = f"host {name} (kernel {kernel_release})"
    lock = refuses_unsigned(lockdown)
    if lock:
        raise FleetError(f"{where}: {lock}; it would refuse the unsigned patched modules")
    try:
        art = load_artifact(artifacts_dir or ARTIFACTS, kernel_release)  # checks sha256
    except FleetError as e:
        raise FleetError(f"{where}: {e}") from None
    why = interlock(settings, usage, art.reuse_design)
    if why:
        raise FleetError(f"{where}: {why}")
    return HostPlan(
        host=name,
        settings=settings,
        kernel_release=kernel_release,
        tarball=str(art.tarball),
        tarball_sha256=art.tarball_sha256,
        modules=art.modules,
        patchset=art.set_id,
        reuse=art.reuse_design,
        usage=usage,
    )


def plan_host(host: Host) -> HostPlan:
    """Check one host and return its plan, or raise DeployRefused naming host and reason."""
    settings_for(host)  # policy errors first: they need no fact
    try:
        return decide(
            host.name,
            host_data(host),
            host.get_fact(KernelVersion).strip(),
            host.get_fact(Lockdown),
            host.get_fact(IpvsUsage),
        )
    except FleetError as e:
        raise DeployRefused(str(e)) from None
