"""ipvs-fleet: roll the conn_reuse_old_conntrack IPVS fix out to a Linux fleet, safely."""

from importlib.metadata import PackageNotFoundError, version

try:
    # pyproject.toml's version, as installed: the one place it is written
    __version__ = version("ipvs-fleet")
except PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"
