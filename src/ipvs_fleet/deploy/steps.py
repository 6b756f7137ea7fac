"""The deploy, as reusable pyinfra deploys: install, configure, activate, verify, roll back."""

from __future__ import annotations

from pyinfra import host
from pyinfra.api import deploy

from ipvs_fleet.deploy import operations as ipvs
from ipvs_fleet.deploy.plan import (
    HostPlan,
    plan_host,
    read_facts,
    running_kernel,
    settings_for,
)


@deploy("Roll out the patched IPVS modules")
def rollout() -> None:
    """Preflight every host (at load time), then install, configure, activate, verify."""
    plan: HostPlan | None = plan_host(host)
    if plan is None:
        return  # lost while its facts were read: failed, no operation
    if plan.build_on_host:
        ipvs.modules_built_on_host(
            name=f"Build patch set {plan.patchset} on the host (DKMS) for {plan.kernel_release}",
            kernel_release=plan.kernel_release,
            tarball=plan.tarball,
            tarball_sha256=plan.tarball_sha256,
            set_id=plan.patchset,
            modules=sorted(plan.modules),
        )
    else:
        ipvs.modules_installed(
            name=f"Install patch set {plan.patchset} for {plan.kernel_release}",
            kernel_release=plan.kernel_release,
            tarball=plan.tarball,
            tarball_sha256=plan.tarball_sha256,
            modules=plan.modules,
        )
    ipvs.config_files(
        name=f"Write the {plan.settings.host_class} sysctl, modules-load and modprobe files",
        settings=plan.settings,
    )
    ipvs.modules_active(
        name=f"Activate the patched modules ({plan.settings.activation})",
        settings=plan.settings,
        patchset=plan.patchset,
    )
    ipvs.sysctls_live(
        name=f"Set the {plan.settings.host_class} IPVS sysctls live",
        settings=plan.settings,
    )
    if plan.settings.activation != "next-boot":
        ipvs.verified(
            name="Verify the patched modules and the class values are live",
            patchset=plan.patchset,
            sysctls=plan.settings.sysctls,
        )


@deploy("Roll back to the stock IPVS modules")
def rollback() -> None:
    """Stock modules and the previous config files back, verified: the knob is gone."""
    settings = settings_for(host)
    kr = read_facts(host, lambda: running_kernel(host))
    if kr is None:
        return  # lost while its facts were read: failed, no operation
    ipvs.modules_removed(name=f"Remove the patched modules for {kr}", kernel_release=kr)
    ipvs.config_files_restored(name="Restore the previous sysctl, modules-load, modprobe files")
    ipvs.modules_active(
        name=f"Activate the stock modules ({settings.activation})",
        settings=settings,
        patchset="",
    )
    if settings.activation != "next-boot":
        ipvs.verified(
            name="Verify the stock modules are loaded and the knob is gone",
            patchset="",
            sysctls={},
        )
