"""Where ipvs-fleet finds its own files and the user's: the one resolver every module uses.

Package data (`ipvs_fleet/data/`, read through importlib.resources) mirrors the repository's
top level: the Ansible collection `ansible_collections/ipvs_fleet/fleet` (its playbooks, its
filter, and the role `roles/ipvs_fleet`, linked into it: templates and host scripts), the fleet
policy `policy/`, `checks/`, the pyinfra deploy files (`deploy.py`, `deploy/rollback.py`,
`group_data/`), `inventory/` and `lab/fleet.yml`. In a checkout these are symlinks to the
top-level paths that Ansible and pyinfra use, so each file exists once; a wheel carries the
files.

The policy is `--policy` / $IPVS_FLEET_POLICY (a host_classes.yml, or a directory holding
host_classes.yml and optionally rollout.yml), else the packaged `policy/`. What the
tool writes (artifacts/, reports/, .lab/, .simfleet/) goes to the current directory.

>>> role_dir() / "templates"
PosixPath('.../ipvs_fleet/data/ansible_collections/ipvs_fleet/fleet/roles/ipvs_fleet/templates')
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from ipvs_fleet.errors import ConfigError

POLICY_ENV = "IPVS_FLEET_POLICY"
HOST_CLASSES = "host_classes.yml"
ROLLOUT = "rollout.yml"


def data_dir() -> Path:
    """The package data directory (a real directory: pyinfra, pytest and Ansible read files)."""
    root = resources.files("ipvs_fleet") / "data"
    if not isinstance(root, Path) or not root.is_dir():
        raise ConfigError(
            f"ipvs-fleet's package data is not a directory ({root}): install the package as "
            "files (pip install), not zipped"
        )
    return root


def data_path(relative: str | Path) -> Path:
    """A packaged file by its repository-relative path, e.g. `deploy/rollback.py`."""
    return data_dir() / relative


def collections_dir() -> Path:
    """An ANSIBLE_COLLECTIONS_PATH entry holding the collection ipvs_fleet.fleet."""
    return data_path("ansible_collections").parent


def collection_dir() -> Path:
    """The Ansible collection ipvs_fleet.fleet (`ansible-galaxy collection build` there)."""
    return data_path("ansible_collections/ipvs_fleet/fleet")


def role_dir() -> Path:
    """The collection's role `ipvs_fleet.fleet.ipvs_fleet`."""
    return collection_dir() / "roles" / "ipvs_fleet"


def templates_dir() -> Path:
    return role_dir() / "templates"


def report_template(name: str) -> Path:
    """A report template of ipvs-fleet itself, e.g. `check-report.html.j2`."""
    return data_path("reports") / name


def host_script(name: str) -> Path:
    """A script the deploy uploads to hosts, e.g. `ipvs-dkms-install.sh`."""
    return role_dir() / "files" / name


def checks_dir() -> Path:
    """The fleet checks (pytest-testinfra); $IPVS_FLEET_CHECKS names another directory."""
    env = os.environ.get("IPVS_FLEET_CHECKS")
    return Path(env) if env else data_path("checks")


def default_policy_dir() -> Path:
    """The policy's one copy, `policy/`: both engines read it through this package (the
    role's filter too), neither from inside the role."""
    return data_path("policy")


def policy_file(name: str = HOST_CLASSES, override: str | Path | None = None) -> Path:
    """The policy file `name` (host_classes.yml or rollout.yml).

    `override` (else $IPVS_FLEET_POLICY) is a host_classes.yml or a directory: a directory
    must hold host_classes.yml; its rollout.yml is optional (the packaged one otherwise).
    A file override names host_classes.yml only.
    """
    chosen = override or os.environ.get(POLICY_ENV)
    if chosen:
        p = Path(chosen)
        if p.is_dir():
            if (p / name).is_file() or name == HOST_CLASSES:
                return p / name
        elif name == HOST_CLASSES:
            return p
    return default_policy_dir() / name


def workdir() -> Path:
    """Where the tool keeps what it writes (artifacts/, reports/, .lab/): the current
    directory, the checkout's root when run from there (as make does)."""
    return Path.cwd()


def deploy_file(name: str) -> Path:
    """A pyinfra deploy file of the rollout policy (`deploy.py`, `deploy/rollback.py`): the
    user's, relative to the current directory, else the packaged one of that name."""
    p = Path(name)
    if p.is_absolute() or p.is_file():
        return p
    packaged = data_path(p)
    if not packaged.is_file():
        raise ConfigError(f"deploy file {name} not found (in {workdir()} or the package)")
    return packaged
