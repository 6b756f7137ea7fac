"""The deploy, as reusable pyinfra deploys: install, configure, activate, verify, roll back.

Operations that repeat per item (a managed file, a sysctl, an activation strategy) run in
`host.loop` over a list that is the same for every host, so each item is one operation of
its own across the fleet, with one name: a preview's table of changes reads
`Set net.ipv4.vs.conn_reuse_old_conntrack live: 1 (k8s-canary)`, never one host's item under
another host's name.
"""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from ipvs_fleet.deploy import operations as ipvs
from ipvs_fleet.deploy.plan import (
    HostPlan,
    check_failure_domain,
    check_host_keys,
    check_sudo,
    plan_host,
    read_facts,
    running_kernel,
    settings_for,
)
from ipvs_fleet.policy import ACTIVATIONS, KNOB, HostSettings, load_policy


def _activate(settings: HostSettings, patchset: str) -> None:
    """modules_active as one operation per strategy, named after it."""
    what = "Load the fix module" if patchset else "Unload the fix module"
    for strategy in host.loop(ACTIVATIONS):
        if strategy == settings.activation:
            ipvs.modules_active(
                name=f"{what} ({strategy})",
                settings=settings,
                patchset=patchset,
            )


def _verify(settings: HostSettings, patchset: str) -> None:
    if settings.activation == "next-boot":
        return  # the running kernel keeps its modules until the next boot
    ipvs.verified(
        name=(
            "Verify the fix module and the class values are live"
            if patchset
            else "Verify the fix module is unloaded and the knob is gone"
        ),
        patchset=patchset,
        sysctls=settings.sysctls if patchset else {},
    )


@deploy("Roll out the fix module ip_vs_reuse")
def rollout() -> None:
    """Preflight every host (at load time), then install, configure, activate, verify."""
    plan: HostPlan | None = plan_host(host)
    if plan is None:
        return  # lost while its facts were read, or refused in a plan: no operation
    if plan.build_on_host:
        ipvs.modules_built_on_host(
            name="Build the fix module on the host (DKMS) and install it",
            kernel_release=plan.kernel_release,
            tarball=plan.tarball,
            tarball_sha256=plan.tarball_sha256,
            set_id=plan.patchset,
            modules=sorted(plan.modules),
        )
    else:
        ipvs.modules_installed(
            name="Install the fix module",
            kernel_release=plan.kernel_release,
            tarball=plan.tarball,
            tarball_sha256=plan.tarball_sha256,
            modules=plan.modules,
            set_id=plan.patchset,
            lock_wait=plan.settings.lock_wait,
        )
    for path in host.loop(ipvs.MANAGED_FILES):
        ipvs.config_file(
            name=f"Write {path}",
            path=path,
            settings=plan.settings,
            lock_wait=plan.settings.lock_wait,
        )
    _activate(plan.settings, plan.patchset)
    # Every key a policy may set, in the schema's order: the same list on every host.
    for key in host.loop(load_policy().schema):
        if key in plan.settings.sysctls:
            ipvs.sysctl_live(
                name=f"Set net.ipv4.vs.{key} live",
                key=key,
                value=plan.settings.sysctls[key],
                activation=plan.settings.activation,
                lock_wait=plan.settings.lock_wait,
            )
    _verify(plan.settings, plan.patchset)


@deploy("Roll back: no fix module, the stock IPVS modules")
def rollback() -> None:
    """The knob to 0, the fix module unloaded (IPVS stays), its files and the previous
    config files back, verified: the knob is gone."""
    check_host_keys(host)  # a host reached trusting a new key gets no operation
    check_failure_domain(host)
    settings = settings_for(host)
    if not check_sudo(host):
        return  # lost while its facts were read: failed, no operation
    kr = read_facts(host, lambda: running_kernel(host))
    if kr is None:
        return  # lost while its facts were read: failed, no operation
    ipvs.sysctl_live(
        name="Set net.ipv4.vs.conn_reuse_old_conntrack to 0",
        key=KNOB,
        value=0,
        if_present=True,
        lock_wait=settings.lock_wait,
    )
    ipvs.modules_removed(
        name="Remove the fix module's files",
        kernel_release=kr,
        lock_wait=settings.lock_wait,
    )
    for path in host.loop(ipvs.MANAGED_FILES):
        ipvs.config_file_restored(
            name=f"Restore the previous {path}", path=path, lock_wait=settings.lock_wait
        )
    _activate(settings, "")
    _verify(settings, "")
