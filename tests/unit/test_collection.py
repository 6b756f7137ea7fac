"""The Ansible collection ipvs_fleet.fleet: galaxy.yml, what `ansible-galaxy collection
build` puts in the tarball, an offline install of it, and its playbooks run by FQCN from
the installed copy (syntax; a preflight refusal on this machine, nothing changed)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest
import yaml

from ipvs_fleet import resources
from tests.fixtures.collection import BIN, COLLECTION, REPO, collection_env, galaxy

ROLE = "roles/ipvs_fleet"


def tar_names(tarball: Path) -> set[str]:
    with tarfile.open(tarball) as t:
        return {m.name.removeprefix("./") for m in t.getmembers() if m.isfile()}


def test_galaxy_yml_names_the_collection_and_its_version() -> None:
    g = galaxy()
    assert (g["namespace"], g["name"]) == ("ipvs_fleet", "fleet")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    # the filters need the ipvs-fleet of the same version: declared, and pinned equal
    assert g["version"] == project["version"]
    pins = [ln for ln in (COLLECTION / "requirements.txt").read_text().splitlines()
            if ln and not ln.startswith("#")]  # fmt: skip
    assert pins == [f"{project['name']}=={project['version']}"]
    assert g["dependencies"] == {}  # ansible.builtin only
    runtime = yaml.safe_load((COLLECTION / "meta/runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")


def test_tarball_carries_role_plugin_playbooks_and_policy(collection_tarball: Path) -> None:
    names = tar_names(collection_tarball)
    assert {"MANIFEST.json", "FILES.json", "README.md", "requirements.txt",
            "meta/runtime.yml", "plugins/filter/ipvs_fleet.py",
            "playbooks/site.yml", "playbooks/rollback.yml",
            f"{ROLE}/tasks/main.yml", f"{ROLE}/defaults/main.yml",
            f"{ROLE}/policy/host_classes.yml", f"{ROLE}/policy/rollout.yml",
            f"{ROLE}/files/ipvs-dkms-install.sh",
            f"{ROLE}/templates/90-ipvs-fleet.conf.j2"} <= names  # fmt: skip
    # no module swap any more: the fix module loads beside the distro's own ip_vs
    assert f"{ROLE}/files/ipvs-swap.sh" not in names
    # every file of the source collection, no build leftovers, no lint config
    source = {
        str(p.relative_to(COLLECTION))
        for p in COLLECTION.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".ansible" not in p.parts
    }
    assert source - {".ansible-lint", "galaxy.yml"} == names - {"MANIFEST.json", "FILES.json"}
    # the policy is role data, not role vars (vars/ holds only the derived state)
    assert not [n for n in names if n.startswith(f"{ROLE}/vars/") and n != f"{ROLE}/vars/main.yml"]
    with tarfile.open(collection_tarball) as t:
        manifest = json.load(t.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
        policy = t.extractfile(f"{ROLE}/policy/host_classes.yml").read()  # type: ignore[union-attr]
    assert manifest["collection_info"]["version"] == galaxy()["version"]
    # one policy: the tarball's is the file the Python engine reads
    assert policy == resources.policy_file().read_bytes()


def test_installed_collection_playbooks_parse_by_fqcn(installed_collection, tmp_path) -> None:
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "--syntax-check",
         "ipvs_fleet.fleet.site", "ipvs_fleet.fleet.rollback"],
        cwd=tmp_path, env=collection_env(installed_collection),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    # the installed copy ran, not the checkout's
    assert f"{installed_collection}/ansible_collections/ipvs_fleet/fleet/playbooks/site.yml" in (
        r.stdout
    )


def test_installed_collection_refuses_an_unknown_class_before_any_change(
    installed_collection, tmp_path
) -> None:
    """The installed collection's filters and policy work outside the checkout: a host of an
    unknown class is refused in the preflight, naming host and reason."""
    inv = tmp_path / "inv.yml"
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable,
             "ansible_become": False}  # fmt: skip
    inv.write_text(json.dumps({"all": {"hosts": {"bad": dict(local, ipvs_host_class="web")}}}))
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), "ipvs_fleet.fleet.site", "--check"],
        cwd=tmp_path, env=collection_env(installed_collection),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "host bad: unknown host class 'web'" in out
    assert "Roll out in waves" not in out


@pytest.mark.parametrize("tag", ["preflight", "install", "configure", "activate", "verify"])
def test_each_phase_has_its_tag(installed_collection, tmp_path, tag: str) -> None:
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "--list-tasks", "--tags", tag,
         "ipvs_fleet.fleet.site"],
        cwd=tmp_path, env=collection_env(installed_collection),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    tasks = [ln.strip() for ln in r.stdout.splitlines() if "TAGS: [" in ln]
    own = [t for t in tasks if f"{tag}" in t.split("TAGS: [")[1] and "always" not in t]
    assert own or tag == "preflight", r.stdout
    # the plan and the state read run whatever the tag: every phase decides from them
    assert any("Read the host's IPVS state" in t for t in tasks), r.stdout
