"""Roll hosts back to the stock IPVS modules: `pyinfra inventory/<env>.py deploy/rollback.py`.

Removes the patched set, restores the sysctl/modules-load/modprobe files the deploy replaced,
switches the running stack back by the host's activation strategy and verifies the knob is gone.
"""

from ipvs_fleet.deploy.steps import rollback

rollback()
