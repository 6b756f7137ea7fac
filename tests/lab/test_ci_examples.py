"""The CI examples run: the shell commands of ci-examples/github-actions.yml and
gitlab-ci.yml, read from the YAML (tests/fixtures/ci_examples.py), run against the lab as the
examples document their inputs: the example's own install lines into a fresh virtualenv,
in order (the dependencies from ci-examples/requirements.lock, copied into the repository as
a user does, by their hashes from PyPI, which stands in for GitLab's registry; then
ipvs-fleet --no-deps: the wheel of this tree instead of a release), a repository of
`ipvs-fleet init` with the lab's hosts in inventory/prod.py (no key paths: the example's
SSH step provides them), the lab's client key and host keys as the
secret / File variables, a scratch HOME. The hosts are converged first (a deploy), so the
check must pass: the JUnit file the job publishes must hold every host's checks and no
failure or error. The two jobs' installs (pip on the controller) run together while that
deploy runs on the guests; their checks run one after the other.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ipvs_fleet.lab import Lab
from ipvs_fleet.lab.inventory import lab_class_data
from tests.fixtures.ci_examples import (
    GITHUB,
    GITLAB,
    LOCK,
    Command,
    Job,
    from_wheel,
    github_job,
    gitlab_job,
    is_install,
)
from tests.fixtures.deploy import Deployer
from tests.fixtures.wheel import build_wheel

pytestmark = [pytest.mark.lab, pytest.mark.pypi, pytest.mark.destructive]


def user_inventory(lab: Lab) -> str:
    """inventory/prod.py as a user writes it for these hosts: where to reach them, their class
    and the lab's latency budget (lab_class_data: TCG guests), no key or known_hosts paths (the
    CI job's SSH step puts those in ~/.ssh)."""
    lines = ['"""The lab\'s hosts, as a fleet repository lists its own."""', ""]
    class_data = lab_class_data()
    for group, names in lab.groups.items():
        hosts = [
            (
                n,
                {
                    "ssh_hostname": "127.0.0.1",
                    "ssh_port": lab.hosts[n].port,
                    "ssh_user": "root",
                    "ipvs_host_class": lab.hosts[n].host_class,
                    **class_data.get(lab.hosts[n].host_class, {}),
                },
            )
            for n in names
        ]
        lines.append(f"{group} = {hosts!r}")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("ci-wheel"))


def clean_env(venv: Path, home: Path) -> dict[str, str]:
    """A runner's environment: nothing of the checkout, its venv, its lab or an SSH agent
    leaks in."""
    leaks = ("PYTHONPATH", "VIRTUAL_ENV", "SSH_AUTH_SOCK")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("IPVS_FLEET_") and k not in leaks
    }
    return env | {
        "HOME": str(home),
        "CI": "true",
        "COLUMNS": "300",
        "PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}",
    }


def sh(cmd: Command, cwd: Path, env: dict[str, str], timeout: float = 1200) -> str:
    """Run one command as the CI runs a step (bash, -e, pipefail); its output."""
    r = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", cmd.shell],
        cwd=cwd,
        env=env | cmd.env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert r.returncode == 0, (
        f"$ {cmd.shell}\nexit {r.returncode}\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    )
    return r.stdout + r.stderr


@dataclass
class Runner:
    """One example's job as its runner holds it: a scratch HOME, the checkout folder, the
    fresh virtualenv and the environment; `installed` is the job's `pip install` (of the
    wheel), started at once in the background."""

    job: Job
    tmp: Path
    env: dict[str, str]
    installed: Future[None] | None = None

    @property
    def home(self) -> Path:
        return self.tmp / "home"

    @property
    def repo(self) -> Path:
        return self.tmp / "repo"

    @property
    def installs(self) -> list[Command]:
        """The job's commands up to its install of ipvs-fleet (the locked dependencies
        first)."""
        n = next(i for i, c in enumerate(self.job.commands) if is_install(c))
        return self.job.commands[: n + 1]

    def install(self, wheel: Path) -> None:
        """The virtualenv, then the job's install lines, in order (ipvs-fleet's: the wheel)."""
        subprocess.run(
            [sys.executable, "-m", "venv", str(self.tmp / "venv")], check=True, timeout=300
        )
        (self.repo / "requirements.lock").write_text(LOCK.read_text())
        for cmd in self.installs:
            sh(from_wheel(cmd, wheel) if is_install(cmd) else cmd, self.repo, self.env)

    def run(self, lab: Lab) -> None:
        """After the install: the repository, the job's other commands."""
        assert self.installed is not None
        self.installed.result()
        sh(Command("ipvs-fleet init ."), self.repo, self.env)
        (self.repo / "inventory" / "prod.py").write_text(user_inventory(lab))
        for cmd in self.job.commands[len(self.installs) :]:
            print(sh(cmd, self.repo, self.env)[-3000:])


def github_runner(lab: Lab, tmp: Path) -> Runner:
    repo = tmp / "repo"
    context = {
        "secrets.FLEET_SSH_KEY": lab.client_key.read_text().rstrip("\n"),
        "vars.FLEET_KNOWN_HOSTS": lab.known_hosts.read_text().rstrip("\n"),
        "vars.IPVS_FLEET_REPO": "example/ipvs-fleet",  # replaced by the wheel
        "vars.IPVS_FLEET_COMMIT": "0" * 40,
        "github.workspace": str(repo),
    }
    job = github_job(yaml.safe_load(GITHUB.read_text()), context)
    env = clean_env(tmp / "venv", tmp / "home") | {"GITHUB_WORKSPACE": str(repo)}
    return Runner(job, tmp, env)


def gitlab_runner(lab: Lab, tmp: Path) -> Runner:
    variables = {
        "CI_PROJECT_DIR": str(tmp / "repo"),
        # the masked registry URL: PyPI (the dependencies), the wheel (ipvs-fleet)
        "PIP_INDEX_URL": "https://pypi.org/simple",
        # File variables: GitLab writes the value to a file, the variable is its path
        "FLEET_SSH_KEY": str(lab.client_key),
        "FLEET_KNOWN_HOSTS": str(lab.known_hosts),
    }
    job = gitlab_job(yaml.safe_load(GITLAB.read_text()), variables)
    return Runner(job, tmp, clean_env(tmp / "venv", tmp / "home") | variables)


@pytest.fixture(scope="module")
def runners(
    lab: Lab, wheel: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Runner]]:
    """Both examples' runners, their installs (pip, on the controller) started together
    while the deploy (`converged`, on the guests) runs."""
    made = {
        "github": github_runner(lab, tmp_path_factory.mktemp("github")),
        "gitlab": gitlab_runner(lab, tmp_path_factory.mktemp("gitlab")),
    }
    with ThreadPoolExecutor(len(made)) as pool:
        for r in made.values():
            r.home.mkdir()
            r.repo.mkdir()
            r.installed = pool.submit(r.install, wheel)
        yield made


def assert_junit_passes(path: Path, lab: Lab) -> None:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    cases = [c for s in suites for c in s.findall("testcase")]
    tests = sum(int(s.get("tests", 0)) for s in suites)
    print(f"{path}: {len(suites)} suites, {tests} tests")
    assert tests == len(cases) > 0
    assert [int(s.get(k, 0)) for s in suites for k in ("failures", "errors")] == [0] * (
        2 * len(suites)
    )
    assert not [c for c in cases if c.find("failure") is not None or c.find("error") is not None]
    # pytest's JUnit: each testcase names its host in a property
    checked = {
        p.get("value")
        for c in cases
        for p in c.iterfind("properties/property")
        if p.get("name") == "host"
    }
    assert checked == set(lab.hosts), checked


def run_and_check(r: Runner, lab: Lab) -> None:
    """Run the job; its SSH step wrote the key, and every JUnit file it publishes passes."""
    r.run(lab)
    assert (r.home / ".ssh" / "id_ed25519").is_file()
    for junit in r.job.junit:
        assert_junit_passes(r.repo / junit, lab)


@pytest.fixture(scope="module")
def converged(lab: Lab, deployer: Deployer, runners: dict[str, Runner]) -> Lab:
    """The lab's hosts converged (earlier tests leave them in other states), while the
    runners install."""
    deployer.run()
    return lab


def test_github_actions_example_runs_and_its_junit_passes(
    converged: Lab, runners: dict[str, Runner]
) -> None:
    run_and_check(runners["github"], converged)


def test_gitlab_ci_example_runs_and_its_junit_passes(
    converged: Lab, runners: dict[str, Runner]
) -> None:
    run_and_check(runners["gitlab"], converged)
