"""Preflight: decide, before any host is changed, what each host gets, or refuse the whole run.

pyinfra loads the deploy file for every host before it executes any operation, and an
exception raised while loading aborts the run for all hosts. So everything that can make a
host's deploy invalid (policy, missing artifact, lockdown, the reuse interlock) is checked
here, at load time. First of all whether the host was connected to with its key checked: a
host whose inventory set no host key checking was reached trusting a new key on first use
(pyinfra connects before the deploy file runs), and gets nothing (ipvs_fleet.hostkeys).

A plan (`ipvs-fleet rollout --dry`: a dry run with $IPVS_FLEET_PREFLIGHT=report) wants
every host's verdict, not the first refusal: there a refused host is logged
(`[host] refused: <why>`) and failed alone, and the other hosts are planned.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from paramiko import SSHException
from pyinfra import logger
from pyinfra.api.exceptions import ConnectError, PyinfraError
from pyinfra.api.host import Host
from pyinfra.connectors.ssh import SSHConnector
from pyinfra.context import ContextObject
from pyinfra.facts.server import Command, KernelVersion

from ipvs_fleet.build.artifact import load_artifact
from ipvs_fleet.deploy.facts import (
    DkmsReady,
    IpvsUsage,
    Lockdown,
    dkms_problems,
    refuses_unsigned,
)
from ipvs_fleet.errors import FleetError
from ipvs_fleet.hostkeys import KEY, unchecked
from ipvs_fleet.kernel import reuse_unsafe
from ipvs_fleet.policy import KNOB, HostSettings, load_policy
from ipvs_fleet.resources import workdir

T = TypeVar("T")
ARTIFACTS = Path(os.environ.get("IPVS_FLEET_ARTIFACTS", workdir() / "artifacts"))
# $IPVS_FLEET_PREFLIGHT=report: a refused host fails alone (a plan), instead of the run.
PREFLIGHT_ENV = "IPVS_FLEET_PREFLIGHT"
REFUSED = "refused: "
DOMAIN_KEY = "ipvs_failure_domain"
# $IPVS_FLEET_DOMAINS=planned: the caller (ipvs-fleet rollout) never runs two members of a
# failure domain at once; a run holding both is then its plan of all hosts.
DOMAINS_ENV = "IPVS_FLEET_DOMAINS"


class DeployRefused(PyinfraError):
    """A host cannot be deployed as asked; nothing has been changed on any host."""


@dataclass(frozen=True)
class HostPlan:
    """What one host gets: its settings and the verified artifact for its kernel (or, in
    build mode, the DKMS tree that builds it there)."""

    host: str
    settings: HostSettings
    kernel_release: str
    tarball: str
    tarball_sha256: str
    modules: dict[str, str]  # file -> sha256; build mode: file -> "" (built on the host)
    patchset: str
    reuse: str
    usage: dict[str, Any]

    @property
    def build_on_host(self) -> bool:
        return self.settings.install == "dkms"


def host_data(host: Host) -> dict[str, Any]:
    """The ipvs_* keys of a host's merged host/group data."""
    return {k: v for k, v in host.data.dict().items() if str(k).startswith("ipvs_")}


def check_host_keys(host: Host) -> None:
    """DeployRefused for an SSH host whose data set no host key checking: pyinfra has
    connected to it trusting whatever key it presented (other connectors have no host key)."""
    if not issubclass(host.connector_cls, SSHConnector):
        return
    why = unchecked(host.name, host.data.get(KEY), host.data.get("ssh_known_hosts_file"))
    if why:
        raise DeployRefused(why)


def _real(host: Host) -> Host:
    """The Host behind pyinfra's context proxy (its state and identity), or `host` itself."""
    real: Host = host._get_module() if isinstance(host, ContextObject) else host
    return real


def check_failure_domain(host: Host) -> None:
    """DeployRefused when this run takes another member of the host's failure domain too
    (host data ipvs_failure_domain): pyinfra runs each operation on all its hosts at once, so
    both directors of a pair would drain and activate together."""
    domain = host.data.get(DOMAIN_KEY)
    if not domain or os.environ.get(DOMAINS_ENV) == "planned":
        return
    real = _real(host)
    others = sorted(
        h.name
        for h in real.state.activated_hosts
        if h is not real and h.data.get(DOMAIN_KEY) == domain
    )
    if others:
        raise DeployRefused(
            f"host {host.name}: {DOMAIN_KEY} {domain}: this run also takes {', '.join(others)}; "
            "a failure domain is changed one member at a time: `ipvs-fleet rollout` (backup "
            "first), or one run per member with --limit"
        )


def settings_for(host: Host) -> HostSettings:
    try:
        return load_policy().for_host(host.name, host_data(host))
    except FleetError as e:
        raise DeployRefused(str(e)) from None


def interlock(settings: HostSettings, usage: dict[str, Any], reuse: str | None) -> str | None:
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
    unsafe = reuse_unsafe(reuse, usage)
    return f"{KNOB}=1 refused: {unsafe}" if unsafe else None


def decide(
    name: str,
    data: dict[str, Any],
    kernel_release: str,
    lockdown: dict[str, Any],
    usage: dict[str, Any],
    artifacts_dir: Path | None = None,
    policy_file: Path | str | None = None,
    dkms_ready: dict[str, Any] | None = None,
) -> HostPlan:
    """The plan for one host from its data and facts, or FleetError naming host and reason.

    Shared by the pyinfra preflight and the Ansible role's filter, so both engines refuse
    and decide alike. Build mode needs `dkms_ready` (the DkmsReady fact); an engine that
    does not pass it does not support build mode, and says so.
    """
    settings = load_policy(policy_file).for_host(name, data)
    where = f"host {name} (kernel {kernel_release})"
    lock = refuses_unsigned(lockdown)
    if lock:
        raise FleetError(f"{where}: {lock}; it would refuse the unsigned fix module")
    if settings.install == "dkms":
        return _decide_dkms(settings, where, kernel_release, usage, dkms_ready)
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


def _decide_dkms(
    settings: HostSettings,
    where: str,
    kernel_release: str,
    usage: dict[str, Any],
    ready: dict[str, Any] | None,
) -> HostPlan:
    from ipvs_fleet.build.dkms import dkms_bundle

    if ready is None:
        raise FleetError(
            f"{where}: ipvs_install=dkms (build on the host) is done by the pyinfra deploy "
            "(pyinfra INVENTORY deploy.py); this engine installs built artifacts only"
        )
    problems = dkms_problems(ready, kernel_release)
    if problems:
        raise FleetError(f"{where}: ipvs_install=dkms: {'; '.join(problems)}")
    b = dkms_bundle()
    why = interlock(settings, usage, b.reuse_design)
    if why:
        raise FleetError(f"{where}: {why}")
    return HostPlan(
        host=settings.name,
        settings=settings,
        kernel_release=kernel_release,
        tarball=str(b.tarball),
        tarball_sha256=b.tarball_sha256,
        modules={f"{m}.ko": "" for m in b.modules},
        patchset=b.set_id,
        reuse=b.reuse_design,
        usage=usage,
    )


SUDO_OK = "ipvs-fleet: sudo ok"


def sudo_problem(host: Host) -> str | None:
    """Why the host's sudo (`_sudo` in its data) cannot run the deploy, or None: a sudo
    that asks for a password would stall or fail the run half-way, so it is refused here,
    before any change (a `_sudo_password` in the data answers it)."""
    data = host.data
    if not data.get("_sudo") or data.get("_sudo_password"):
        return None
    out = host.get_fact(Command, f"sudo -n true 2>&1 && echo '{SUDO_OK}'; true", _sudo=False)
    if out is None or SUDO_OK in str(out):
        return None  # None: pyinfra failed the read, read_facts fails the host
    user = data.get("ssh_user") or "the SSH user"
    why = " ".join(str(out).split())[:200] or "no reason given"
    return (
        f"host {host.name}: sudo as {user} asks for a password ({why}); give {user} "
        "passwordless sudo, or set _sudo_password in the host data"
    )


def running_kernel(host: Host) -> str:
    """The host's `uname -r`; "" when pyinfra failed the read (it then returns None), which
    read_facts turns into a failed host before anything is decided from it."""
    return (host.get_fact(KernelVersion) or "").strip()


def kernel_line(kernel_release: str) -> str:
    """ "6.1.0-56-cloud-amd64" -> "6.1"."""
    return ".".join(kernel_release.split(".")[:2])


# What a host that stops answering raises from a fact read (paramiko, sockets, pyinfra).
CONNECTION_LOST = (EOFError, OSError, SSHException, ConnectError)


def read_facts(host: Host, read: Callable[[], T]) -> T | None:
    """`read()`, or None after failing this host alone when it stops answering meanwhile.

    pyinfra aborts the whole run on an exception while it loads the deploy for each host;
    a host lost after connecting is no reason to abort the others (as a host that does not
    connect at all is not): it is marked failed, gets no operation, and the run exits 1.
    """
    real = _real(host)
    try:
        value = read()
    except CONNECTION_LOST as e:
        logger.error(
            f"[{host.name}] connection lost while reading its facts "
            f"({type(e).__name__}: {e}); this host fails, the others go on"
        )
        # The set outlives this greenlet's host context: hold the Host, not pyinfra's proxy.
        real.state.fail_hosts({real})
        return None
    # pyinfra itself fails a host whose fact command hit an SSH error, and hands back the
    # fact's default (None, {}): no decision may be made from those.
    if real in real.state.failed_hosts:
        logger.error(
            f"[{host.name}] a fact read failed (connection lost?); this host fails, "
            "the others go on"
        )
        return None
    return value


def refusals_reported() -> bool:
    """Whether a refused host fails alone ($IPVS_FLEET_PREFLIGHT=report) instead of the run."""
    return os.environ.get(PREFLIGHT_ENV, "") == "report"


def plan_host(host: Host) -> HostPlan | None:
    """Check one host and return its plan, or raise DeployRefused naming host and reason
    (None: the host stopped answering and is failed, see read_facts; or, when refusals are
    reported, the host was refused and is failed alone)."""
    try:
        return _plan_host(host)
    except DeployRefused as e:
        if not refusals_reported():
            raise
        logger.error(f"{host.print_prefix}{REFUSED}{e}")
        real = _real(host)
        real.state.fail_hosts({real})
        return None


def check_sudo(host: Host) -> bool:
    """Raise DeployRefused if the host's sudo asks for a password; False if the host was
    lost meanwhile (failed by read_facts)."""
    got = read_facts(host, lambda: [sudo_problem(host)])
    if got is None:
        return False
    if got[0]:
        raise DeployRefused(got[0])
    return True


def _plan_host(host: Host) -> HostPlan | None:
    check_host_keys(host)  # before anything is read from or decided for the host
    check_failure_domain(host)
    settings = settings_for(host)  # policy errors first: they need no fact
    if not check_sudo(host):
        return None

    def facts() -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any] | None]:
        kr = running_kernel(host)
        ready = host.get_fact(DkmsReady, kernel_release=kr) if settings.install == "dkms" else None
        return kr, host.get_fact(Lockdown), host.get_fact(IpvsUsage), ready

    got = read_facts(host, facts)
    if got is None:
        return None
    kr, lockdown, usage, ready = got
    try:
        return decide(host.name, host_data(host), kr, lockdown, usage, dkms_ready=ready)
    except FleetError as e:
        raise DeployRefused(str(e)) from None
