"""The paths ipvs-fleet owns on a fleet host, written once.

The deploy, the checks, the rollout gate and the simulated fleet import them from here; the
role's files (YAML, templates, scripts) spell them out and tests/unit/test_paths.py fails
when one of those copies differs from these values. The probe's guest files (probe/) run
without ipvs_fleet on the host and keep their own lab-only paths.
"""

# root's alone (0700): the host lock, staging, backups of replaced files, build logs
STATE_DIR = "/var/lib/ipvs-fleet"
LOCK = f"{STATE_DIR}/lock"
DKMS_BUILD_LOG = f"{STATE_DIR}/dkms-build.log"

# the managed configuration files
SYSCTL_DIR = "/etc/sysctl.d"
SYSCTL_FILE = f"{SYSCTL_DIR}/90-ipvs-fleet.conf"
MODULES_LOAD_FILE = "/etc/modules-load.d/ipvs-fleet.conf"
MODPROBE_FILE = "/etc/modprobe.d/ipvs-fleet.conf"

# the fix module: /lib/modules/<kernel_release>/UPDATES_SUBDIR, or built by DKMS
UPDATES_SUBDIR = "updates/ipvs-fleet"
DKMS_NAME = "ipvs-fleet"
DKMS_TREE = f"/var/lib/dkms/{DKMS_NAME}"  # /<version> per built version
DKMS_SOURCE_PREFIX = f"/usr/src/{DKMS_NAME}-"  # + <version>

# tmpfs, root only: what a check or the rollout gate copies to a host for one run
CHECK_DIR = "/run/ipvs-fleet-check"
HELD_DIR = "/run/ipvs-fleet-held"
