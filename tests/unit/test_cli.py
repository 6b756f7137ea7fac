"""The `ipvs-fleet` command itself: --version, --policy, and `init` of a fleet repository."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from ipvs_fleet import resources
from ipvs_fleet.cli import main, parser, use_policy
from ipvs_fleet.compliance.inventory import load_inventory
from ipvs_fleet.errors import ConfigError
from ipvs_fleet.hostkeys import KEY, STRICT
from ipvs_fleet.policy import load_policy
from ipvs_fleet.userrepo import init_repo, skeleton

REPO = Path(__file__).resolve().parents[2]


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert capsys.readouterr().out == f"ipvs-fleet {project['version']}\n"


@pytest.mark.parametrize(
    "argv",
    [
        ["--policy", "pol", "lab", "status"],
        ["lab", "--policy", "pol", "status"],
        ["rollout", "inv.py", "--policy", "pol"],
        ["check", "inv.py", "--policy", "pol"],
        ["--policy", "pol", "check", "inv.py"],
    ],
)
def test_policy_option_is_exported_for_the_children(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ: dict[str, str] = {}
    use_policy(parser().parse_args(argv), environ)
    assert environ == {resources.POLICY_ENV: str(tmp_path / "pol")}


def test_no_policy_option_leaves_the_environment() -> None:
    environ = {resources.POLICY_ENV: "/srv/fleet/policy"}
    use_policy(parser().parse_args(["lab", "status"]), environ)
    assert environ == {resources.POLICY_ENV: "/srv/fleet/policy"}


def test_init_writes_the_packaged_skeleton(tmp_path: Path) -> None:
    repo = tmp_path / "fleet"
    assert main(["init", str(repo)]) == 0
    for rel, src in skeleton().items():
        assert (repo / rel).read_bytes() == src.read_bytes(), rel
    assert (
        repo / "policy" / "host_classes.yml"
    ).read_bytes() == resources.policy_file().read_bytes()


def test_init_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "deploy.py").write_text("# mine\n")
    with pytest.raises(ConfigError, match=r"would overwrite deploy\.py"):
        init_repo(tmp_path)
    assert (tmp_path / "deploy.py").read_text() == "# mine\n"
    init_repo(tmp_path, force=True)
    assert (tmp_path / "deploy.py").read_bytes() == resources.data_path("deploy.py").read_bytes()


def test_initialised_repository_is_a_valid_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example inventory loads from the repository (its group_data applied) and every
    host's class is valid under the repository's own policy."""
    init_repo(tmp_path)
    monkeypatch.chdir(tmp_path)
    hosts = load_inventory("inventory/prod.py")
    assert hosts and all(h.data[KEY] == STRICT for h in hosts)
    assert "canary" in {g for h in hosts for g in h.groups}
    policy = load_policy(tmp_path / "policy")
    for h in hosts:
        ipvs = {k: v for k, v in h.data.items() if k.startswith("ipvs_")}
        assert policy.for_host(h.name, ipvs).host_class == ipvs["ipvs_host_class"]
