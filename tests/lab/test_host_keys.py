"""SSH host keys are checked strictly from any working directory (issue 31, item 1).

pyinfra reads `group_data/` from the working directory and the inventory's directory only,
and connects to every host before the deploy file runs. So a fleet repository written by
`ipvs-fleet init`, its inventory edited as its template says, is run here as cron or CI
run it: `pyinfra <abs inventory> <abs deploy.py>` from `/`, from a directory of no
repository, and from the repository. A lab host whose key is missing from, or different in,
the inventory's known_hosts is refused at the connect, from each of them: the deploy file is
never loaded (no operation), known_hosts is not written. And an inventory that sets no host
key checking at all (pyinfra then trusted a new key on first use) is refused by the deploy
itself, before any operation. Everything works on copies: the lab's own known_hosts is
not touched.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ipvs_fleet.lab.inventory import host_data

pytestmark = [pytest.mark.lab, pytest.mark.side_lab]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "k8s-canary"
# pyinfra prints this when it loads the deploy file for the connected hosts.
PREPARING = "Preparing operation"
# The template's example hosts, as a user replaces them: from its first group to `canary`.
EXAMPLE_HOSTS = re.compile(r"^k8s_nodes = .*?^canary = [^\n]*$", re.S | re.M)
CONNECTION = (
    "ssh_hostname",
    "ssh_port",
    "ssh_user",
    "ssh_key",
    "ssh_allow_agent",
    "ssh_look_for_keys",
)


def connection(lab, known: Path) -> dict[str, object]:
    """The lab host's connection data as a user writes it: no host key checking of its own."""
    d = host_data(lab, HOST)
    return {**{k: d[k] for k in CONNECTION}, "ssh_known_hosts_file": str(known)}


def user_repo(lab, root: Path, known: Path) -> Path:
    """`ipvs-fleet init` a repository whose inventory/prod.py names the lab host."""
    repo = root / "fleet-repo"
    subprocess.run(
        [str(BIN / "ipvs-fleet"), "init", str(repo)], check=True, capture_output=True, timeout=120
    )
    inv = repo / "inventory" / "prod.py"
    hosts = (
        f"k8s_nodes = ([({HOST!r}, {connection(lab, known)!r})], "
        "{'ipvs_host_class': 'k8s_node'})\n"
        f"canary = [{HOST!r}]"
    )
    text, n = EXAMPLE_HOSTS.subn(hosts.replace("\\", "\\\\"), inv.read_text())
    assert n == 1, f"the template's example hosts not found in {inv}:\n{inv.read_text()}"
    inv.write_text(text)
    return repo


def pyinfra(inventory: Path, deploy: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The deploy as cron runs it: absolute paths, from `cwd`; --dry: nothing executes even
    where a host is (wrongly) let through."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPVS_FLEET_LAB")}
    return subprocess.run(
        [str(BIN / "pyinfra"), "-y", "--dry", str(inventory), str(deploy)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def other_key(lab) -> str:
    """Another lab host's key: `HOST` presenting it would be an impostor."""
    other = next(n for n in sorted(lab.hosts) if n != HOST)
    line = next(
        ln
        for ln in lab.known_hosts.read_text().splitlines()
        if ln.startswith(f"[127.0.0.1]:{lab.hosts[other].port} ")
    )
    return line.split(None, 1)[1]


def test_an_unknown_or_changed_host_key_is_refused_from_any_working_directory(lab, tmp_path):
    known = tmp_path / "known_hosts"
    repo = user_repo(lab, tmp_path, known)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    changed = f"[127.0.0.1]:{lab.hosts[HOST].port} {other_key(lab)}\n"
    for label, content in (("missing", ""), ("changed", changed)):
        for cwd in (Path("/"), elsewhere, repo):
            known.write_text(content)
            r = pyinfra(repo / "inventory" / "prod.py", repo / "deploy.py", cwd)
            out = r.stdout + r.stderr
            where = f"key {label}, from {cwd}: exit {r.returncode}\n{out[-3000:]}"
            assert known.read_text() == content, f"known_hosts written; {where}"
            assert r.returncode != 0, where
            assert PREPARING not in out, f"the deploy ran; {where}"
            why = "No host key" if label == "missing" else "BadHostKeyException|does not match"
            assert re.search(why, out), where


def test_the_deploy_refuses_a_host_whose_inventory_sets_no_host_key_checking(lab, tmp_path):
    # A hand-written inventory that sets nothing: run from `/`, pyinfra connects with its
    # default (trust on first use); the key is known here, so the connect itself succeeds.
    known = tmp_path / "known_hosts"
    line = next(
        ln
        for ln in lab.known_hosts.read_text().splitlines()
        if ln.startswith(f"[127.0.0.1]:{lab.hosts[HOST].port} ")
    )
    known.write_text(line + "\n")
    inv = tmp_path / "bare.py"
    inv.write_text(
        f"k8s_nodes = ([({HOST!r}, {connection(lab, known)!r})], "
        "{'ipvs_host_class': 'k8s_node'})\n"
    )
    r = pyinfra(inv, REPO / "deploy.py", Path("/"))
    out = r.stdout + r.stderr
    assert r.returncode != 0, out[-3000:]
    assert f"host {HOST}: SSH host keys are not checked strictly" in out, out[-3000:]
    assert "ssh_strict_host_key_checking" in out
