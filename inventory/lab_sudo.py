"""The lab fleet as a real fleet is reached: SSH as a non-root user with sudo.

    IPVS_FLEET_LAB_DIR=.lab/test pyinfra inventory/lab_sudo.py deploy.py
    ipvs-fleet check inventory/lab_sudo.py

Every lab VM has `fleet` (passwordless sudo) and `fleetpw` (a sudo that asks for a
password); $IPVS_FLEET_LAB_SUDO_USER picks one (default fleet). Host data as inventory/lab.py,
with `ssh_user` that user and `_sudo: True` (pyinfra runs every command through sudo; the
checks do too).
"""

import os

from ipvs_fleet.hostkeys import strict_host_keys
from ipvs_fleet.lab.inventory import pyinfra_groups

globals().update(pyinfra_groups(user=os.environ.get("IPVS_FLEET_LAB_SUDO_USER", "fleet")))
globals().update(strict_host_keys(globals()))  # host keys strict from any directory
