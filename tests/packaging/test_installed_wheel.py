"""ipvs-fleet as a user gets it: the wheel installed with pip (dependencies from PyPI) into a
fresh virtualenv, run from a directory outside the checkout, on a repository made by
`ipvs-fleet init`. Nothing here needs the lab's VMs; the deploy is planned against pyinfra's
@local (a dry run that stops at the preflight: no artifact for this machine's kernel).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from ipvs_fleet.policy import load_policy
from tests.fixtures.wheel import REPO, RESOLVER_PROBE, build_wheel

pytestmark = [pytest.mark.lab, pytest.mark.pypi]

CLOSED_PORT_INVENTORY = """
k8s_nodes = ([("node-1", {"ssh_hostname": "127.0.0.1", "ssh_port": 1})],
             {"ipvs_host_class": "k8s_node"})
canary = ["node-1"]
"""
LOCAL_INVENTORY = 'k8s_nodes = ([("@local", {})], {"ipvs_host_class": "k8s_node"})\n'


@dataclass
class Installed:
    """A virtualenv with the wheel installed, and a user's fleet repository to run in."""

    venv: Path
    repo: Path
    env: dict[str, str]

    def run(
        self, *cmd: str, cwd: Path | None = None, **env: str
    ) -> subprocess.CompletedProcess[str]:
        exe = self.venv / "bin" / cmd[0]
        return subprocess.run(
            [str(exe), *cmd[1:]],
            cwd=cwd or self.repo,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=300,
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    tmp = tmp_path_factory.mktemp("installed")
    wheel = build_wheel(tmp / "build")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # Nothing of the checkout or its venv may leak in: no PYTHONPATH, no IPVS_FLEET_*.
    leaks = ("PYTHONPATH", "VIRTUAL_ENV")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("IPVS_FLEET_") and k not in leaks
    }
    # COLUMNS: rich wraps the rollout's report at 80 columns when not on a terminal.
    env |= {"PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "COLUMNS": "300"}
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    user = tmp / "user"
    user.mkdir()
    r = subprocess.run(
        [str(venv / "bin" / "ipvs-fleet"), "init", "fleet"],
        cwd=user,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    repo = user / "fleet"
    (repo / "inventory" / "closed.py").write_text(CLOSED_PORT_INVENTORY)
    (repo / "inventory" / "local.py").write_text(LOCAL_INVENTORY)
    (tmp / "no-artifacts").mkdir()
    env |= {
        "IPVS_FLEET_POLICY": str(repo / "policy"),
        "IPVS_FLEET_ARTIFACTS": str(tmp / "no-artifacts"),
    }
    return Installed(venv, repo, env)


def test_version_and_help(installed: Installed) -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    r = installed.run("ipvs-fleet", "--version")
    assert (r.returncode, r.stdout) == (0, f"ipvs-fleet {version}\n")
    for sub in ("check", "build", "rollout", "init"):
        r = installed.run("ipvs-fleet", sub, "--help")
        assert r.returncode == 0 and f"usage: ipvs-fleet {sub}" in r.stdout, r.stderr


def test_packaged_files_come_from_site_packages(installed: Installed) -> None:
    # From a directory without a deploy.py or policy of its own: the packaged ones.
    r = installed.run(
        "python", "-c", RESOLVER_PROBE, cwd=installed.repo.parent, IPVS_FLEET_POLICY=""
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    pkg = Path(got["package"]).parent
    assert pkg.parent.name == "site-packages" and installed.venv in pkg.parents
    for key in ("policy", "dkms", "deploy"):
        assert Path(got[key]).is_relative_to(pkg / "data"), got[key]
        assert not Path(got[key]).resolve().is_relative_to(REPO), got[key]
    assert got["classes"] == sorted(load_policy().classes)
    assert "90-ipvs-fleet.conf.j2" in got["templates"] and "conftest.py" in got["checks"]


def test_check_runs_the_packaged_checks_with_the_repository_policy(installed: Installed) -> None:
    r = installed.run("ipvs-fleet", "check", "inventory/closed.py", "--waivers", "waivers.yml")
    # exit 2: the host could not be checked (nothing listens on port 1), after the policy,
    # the inventory and the checks themselves were all found.
    assert r.returncode == 2, r.stdout + r.stderr
    out = r.stdout + r.stderr
    assert "HostUnreachable" in out and "cannot read" not in out
    policy = installed.repo / "policy" / "host_classes.yml"
    text = policy.read_text()
    try:
        policy.write_text(text.replace("  k8s_node:", "  kube_node:", 1))
        r = installed.run("ipvs-fleet", "check", "inventory/closed.py")
        assert r.returncode == 2
        assert "unknown host class 'k8s_node'" in r.stderr and str(policy) in r.stderr
    finally:
        policy.write_text(text)


def test_deploy_is_planned_from_the_repository(installed: Installed) -> None:
    """The repository's deploy.py runs the packaged deploy: pyinfra reads @local's kernel
    and the preflight refuses it for want of an artifact (nothing is changed)."""
    kernel = platform.release()
    r = installed.run(
        "pyinfra", "--dry", "inventory/local.py", "deploy.py", IPVS_FLEET_PREFLIGHT="report"
    )
    assert f"[@local] refused: host @local (kernel {kernel}): no module artifact" in r.stderr
    r = installed.run("ipvs-fleet", "rollout", "inventory/local.py", "--dry", "--waves", "1")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "@local: the deploy would refuse it" in r.stdout + r.stderr
    assert (installed.repo / "reports").is_dir()  # state goes to the user's directory
