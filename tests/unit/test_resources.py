"""The resolver of packaged and user files (ipvs_fleet.resources)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_fleet import resources
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.policy import load_policy

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_policy_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(resources.POLICY_ENV, raising=False)
    monkeypatch.delenv("IPVS_FLEET_CHECKS", raising=False)


@pytest.mark.parametrize(
    "packaged",
    [
        "ansible_collections",
        "checks",
        "deploy.py",
        "deploy/rollback.py",
        "group_data/all.py",
        "inventory/lab.py",
        "lab/fleet.yml",
        "policy/host_classes.yml",
    ],
)
def test_package_data_is_the_top_level_file(packaged: str) -> None:
    """In a checkout each packaged path is the repository's own file, not a copy."""
    assert resources.data_path(packaged).resolve() == (REPO / packaged).resolve()
    assert (REPO / packaged).exists() and not (REPO / packaged).is_symlink()


def test_role_files_resolve_inside_the_package() -> None:
    pkg = Path(resources.__file__).parent
    role = pkg / "data/ansible_collections/ipvs_fleet/fleet/roles/ipvs_fleet"
    assert resources.templates_dir() == role / "templates"
    assert (resources.collection_dir() / "galaxy.yml").is_file()
    assert (resources.collections_dir() / "ansible_collections").is_dir()
    assert (resources.templates_dir() / "90-ipvs-fleet.conf.j2").is_file()
    assert resources.host_script("ipvs-dkms-install.sh").is_file()
    assert (resources.checks_dir() / "conftest.py").is_file()


def test_default_policy_is_the_packaged_policy() -> None:
    assert resources.policy_file() == resources.data_path("policy/host_classes.yml")
    assert resources.policy_file("rollout.yml") == resources.data_path("policy/rollout.yml")
    assert "k8s_node" in load_policy().classes


def write_policy(d: Path, classes: str = "mine") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "host_classes.yml").write_text(
        "sysctl_schema: {conn_reuse_old_conntrack: {min: 0, max: 1}}\n"
        f"host_classes: {{{classes}: {{sysctls: {{conn_reuse_old_conntrack: 1}}}}}}\n"
    )
    return d


def test_policy_directory_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = write_policy(tmp_path / "policy")
    monkeypatch.setenv(resources.POLICY_ENV, str(d))
    assert resources.policy_file() == d / "host_classes.yml"
    assert set(load_policy().classes) == {"mine"}
    # No rollout.yml of its own: the packaged one.
    assert resources.policy_file("rollout.yml") == resources.data_path("policy/rollout.yml")
    (d / "rollout.yml").write_text("waves: [1]\n")
    assert resources.policy_file("rollout.yml") == d / "rollout.yml"


def test_policy_file_override_names_host_classes_only(tmp_path: Path) -> None:
    f = write_policy(tmp_path / "p", "other") / "host_classes.yml"
    assert resources.policy_file(override=f) == f
    assert set(load_policy(f).classes) == {"other"}
    policy_dir = resources.data_path("policy")
    assert resources.policy_file("rollout.yml", override=f).parent == policy_dir


def test_policy_directory_without_host_classes_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="host_classes.yml"):
        load_policy(tmp_path)


def test_deploy_file_prefers_the_users(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resources.deploy_file("deploy/rollback.py") == resources.data_path("deploy/rollback.py")
    (tmp_path / "deploy.py").write_text("")
    assert resources.deploy_file("deploy.py") == Path("deploy.py")
    with pytest.raises(ConfigError, match="no_such.py"):
        resources.deploy_file("no_such.py")


def test_workdir_is_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resources.workdir() == tmp_path
