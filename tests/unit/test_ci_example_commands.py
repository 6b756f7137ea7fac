"""The CI examples read as their CI reads them: commands, environment, JUnit paths; their
SSH setup run in a scratch HOME puts the key and host keys where the checks look; they keep
the supply-chain and no-overlap rules, and their lock is the project's, less the dev tools.
The run against the lab from the installed wheel is tests/lab/test_ci_examples.py."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.fixtures.ci_examples import (
    GITHUB,
    GITLAB,
    LOCK,
    PROJECT_LOCK,
    REPO,
    Command,
    Job,
    expand_variables,
    from_wheel,
    github_job,
    github_problems,
    gitlab_job,
    gitlab_problems,
    is_install,
    runtime_lock,
)

KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\nfake\n-----END OPENSSH PRIVATE KEY-----"
KNOWN = "[127.0.0.1]:2222 ssh-ed25519 AAAAfake"
GITHUB_CONTEXT = {
    "secrets.FLEET_SSH_KEY": KEY,
    "vars.FLEET_KNOWN_HOSTS": KNOWN,
    "vars.IPVS_FLEET_REPO": "example/ipvs-fleet",
    "github.workspace": "/w",
    "vars.IPVS_FLEET_COMMIT": "0123456789abcdef0123456789abcdef01234567",
}
GITLAB_VARIABLES = {
    "CI_PROJECT_DIR": "/w",
    "CI_API_V4_URL": "https://gitlab.example/api/v4",
    "IPVS_FLEET_PROJECT": "42",
}


def github() -> Job:
    return github_job(yaml.safe_load(GITHUB.read_text()), GITHUB_CONTEXT)


def gitlab() -> Job:
    return gitlab_job(yaml.safe_load(GITLAB.read_text()), GITLAB_VARIABLES)


def check_command(job: Job) -> list[str]:
    (cmd,) = [c for c in job.commands if c.shell.lstrip().startswith("ipvs-fleet check")]
    return shlex.split(cmd.shell)


@pytest.mark.parametrize("job", [github, gitlab])
def test_the_check_writes_the_junit_file_the_job_publishes(job) -> None:
    j = job()
    words = check_command(j)
    assert words[2] == "inventory/prod.py"
    assert j.junit == [words[words.index("--junitxml") + 1]]
    (check,) = [c for c in j.commands if c.shell.lstrip().startswith("ipvs-fleet check")]
    assert check.env["IPVS_FLEET_POLICY"] == "/w/policy"


@pytest.mark.parametrize("job", [github, gitlab])
def test_one_install_of_ipvs_fleet_rewritten_to_a_wheel(job) -> None:
    installs = [c for c in job().commands if is_install(c)]
    assert len(installs) == 1
    wheel = Path("/tmp/d/ipvs_fleet-0.1.0-py3-none-any.whl")
    assert from_wheel(installs[0], wheel).shell == f"pip install --no-deps {wheel}"
    extras = Command("pip install -i https://x/simple --no-deps 'ipvs-fleet[plots]==1'")
    assert from_wheel(extras, wheel).shell == f"pip install --no-deps '{wheel}[plots]'"


def test_github_expressions_come_from_the_context() -> None:
    j = github()
    (install,) = [c for c in j.commands if is_install(c)]
    assert "git+https://github.com/${IPVS_FLEET_REPO}@${IPVS_FLEET_COMMIT}" in install.shell
    assert install.env == {
        "IPVS_FLEET_REPO": "example/ipvs-fleet",
        "IPVS_FLEET_COMMIT": GITHUB_CONTEXT["vars.IPVS_FLEET_COMMIT"],
    }
    (ssh,) = [c for c in j.commands if "FLEET_SSH_KEY" in c.shell]
    assert ssh.env == {"FLEET_SSH_KEY": KEY, "FLEET_KNOWN_HOSTS": KNOWN}
    doc = yaml.safe_load(GITHUB.read_text())
    with pytest.raises(KeyError, match=r"no value for \$\{\{ secrets.FLEET_SSH_KEY \}\}"):
        github_job(doc, {k: v for k, v in GITHUB_CONTEXT.items() if k != "secrets.FLEET_SSH_KEY"})


def test_gitlab_variables_expand_as_gitlab_does() -> None:
    assert expand_variables("$A/x ${B}y $C", {"A": "1", "B": "2"}) == "1/x 2y "
    j = gitlab()
    assert [c.shell.split()[0] for c in j.commands] == [
        "pip",
        "pip",
        "install",
        "install",
        "cp",
        "ipvs-fleet",
    ]


def test_a_command_that_is_not_the_install_is_refused() -> None:
    with pytest.raises(ValueError, match="not a pip install of ipvs-fleet"):
        from_wheel(Command("pip install pytest"), Path("w.whl"))


def _run_ssh_setup(commands: list[Command], home: Path, env: dict[str, str]) -> None:
    for c in commands:  # the SSH steps alone: no install (pip), no check
        if "pip install" in c.shell or c.shell.lstrip().startswith("ipvs-fleet"):
            continue
        r = subprocess.run(
            ["bash", "-eo", "pipefail", "-c", c.shell],
            env={"PATH": os.environ["PATH"], "HOME": str(home), **c.env, **env},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert r.returncode == 0, (c.shell, r.stderr)


@pytest.mark.parametrize("ci", ["github", "gitlab"])
def test_ssh_setup_puts_key_and_host_keys_where_the_checks_look(ci: str, tmp_path: Path) -> None:
    """Without ssh_key / ssh_known_hosts_file in the inventory, the checks (paramiko) try the
    user's ~/.ssh/id_<type> keys and ~/.ssh/known_hosts, as ssh and pyinfra do."""
    home = tmp_path / "home"
    home.mkdir()
    if ci == "github":
        _run_ssh_setup(github().commands, home, {})
    else:
        (tmp_path / "key").write_text(KEY + "\n")
        (tmp_path / "known").write_text(KNOWN + "\n")
        files = {"FLEET_SSH_KEY": tmp_path / "key", "FLEET_KNOWN_HOSTS": tmp_path / "known"}
        _run_ssh_setup(gitlab().commands, home, {k: str(v) for k, v in files.items()})
    key = home / ".ssh" / "id_ed25519"
    assert key.read_text() == KEY + "\n"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert (home / ".ssh" / "known_hosts").read_text() == KNOWN + "\n"


def test_the_examples_keep_the_supply_chain_and_no_overlap_rules() -> None:
    assert github_problems(GITHUB.read_text()) == []
    assert gitlab_problems(GITLAB.read_text()) == []


def test_the_rules_catch_what_they_are_for() -> None:
    """Each rule on a copy of the example broken in one place: the lint names it."""
    gh = GITHUB.read_text()
    broken = {
        "permissions": gh.replace("permissions:\n  contents: read\n", "permissions: write-all\n"),
        "checks: write": gh.replace("      checks: write", "      pull-requests: write"),
        "not pinned": gh.replace(
            "actions/checkout@11d5960a326750d5838078e36cf38b85af677262", "actions/checkout@v4"
        ),
        "in run:": gh.replace("${IPVS_FLEET_REPO}", "${{ vars.IPVS_FLEET_REPO }}"),
        "concurrency": gh.replace("cancel-in-progress: false", "cancel-in-progress: true"),
        "timeout-minutes": gh.replace("    timeout-minutes: 30", "    # no timeout"),
        "requirements.lock": gh.replace(" --require-hashes -r requirements.lock", " pyyaml"),
        "--no-deps": gh.replace("pip install --no-deps", "pip install"),
    }
    for rule, text in broken.items():
        assert text != gh, rule
        assert any(rule in p for p in github_problems(text)), rule
    gl = GITLAB.read_text()
    broken = {
        "timeout": gl.replace("  timeout: 30m", "  # no timeout"),
        "resource_group": gl.replace("  resource_group: ipvs-fleet", "  # none"),
        "PIP_INDEX_URL set": gl.replace("  variables:\n", "  variables:\n    PIP_INDEX_URL: x\n"),
        "not from $PIP_INDEX_URL": gl.replace(
            '--index-url "${PIP_INDEX_URL:?the masked CI/CD variable PIP_INDEX_URL is not set}"\n'
            "      --no-deps",
            "--index-url https://pypi.org/simple --no-deps",
        ),
        "requirements.lock": gl.replace("--require-hashes -r requirements.lock", "pyyaml"),
    }
    for rule, text in broken.items():
        assert text != gl, rule
        assert any(rule in p for p in gitlab_problems(text)), rule


def test_the_examples_lock_is_the_projects_less_the_dev_tools() -> None:
    """ci-examples/requirements.lock, what the examples install by hashes: the project's own
    pins and hashes of everything ipvs-fleet[plots] needs, nothing of its dev tools.
    Regenerate: python -m tests.fixtures.ci_examples."""
    want = runtime_lock(PROJECT_LOCK.read_text(), (REPO / "pyproject.toml").read_text())
    assert LOCK.read_text() == want, "stale: python -m tests.fixtures.ci_examples"
    for dev in ("ruff==", "mypy==", "ansible-lint==", "ansible-core=="):
        assert f"\n{dev}" not in want
    for runtime in ("pyinfra==", "paramiko==", "matplotlib==", "numpy==", "cryptography=="):
        assert f"\n{runtime}" in want
