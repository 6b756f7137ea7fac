"""Gate fallback when the fleet checks are not installed: `pyinfra INV verify_deploy.py`.

Reads facts only: the loaded fix module is the host's planned build, every other IPVS module
the distro's own, and its class's values are live (hosts activating at next boot: the
installed module and persisted files only).
"""

from pyinfra import host

from ipvs_fleet.deploy import operations as ipvs
from ipvs_fleet.deploy.plan import plan_host

plan = plan_host(host)  # None: the host stopped answering and is failed
if plan is not None and plan.settings.activation != "next-boot":
    ipvs.verified(
        name="Verify the fix module and the class values are live",
        patchset=plan.patchset,
        sysctls=plan.settings.sysctls,
    )
