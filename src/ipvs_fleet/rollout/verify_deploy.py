"""Gate fallback when the fleet checks are not installed: `pyinfra INV verify_deploy.py`.

Reads facts only: the loaded modules are the host's planned patch set and its class's values
are live (hosts activating at next boot: the installed set and persisted files only); with
`--data ipvs_swap_within=SECONDS`, the live IPVS table equals a swap record that recent.
"""

from pyinfra import host

from ipvs_fleet.deploy import operations as ipvs
from ipvs_fleet.deploy.plan import plan_host

plan = plan_host(host)
within = host.data.get("ipvs_swap_within")  # None: the host stopped answering and is failed
if plan is not None and plan.settings.activation != "next-boot":
    ipvs.verified(
        name="Verify the patched modules and the class values are live",
        patchset=plan.patchset,
        sysctls=plan.settings.sysctls,
        swap_within=None if within in (None, "") else int(within),
    )
