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
    pins = [
        ln
        for ln in (COLLECTION / "requirements.txt").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert pins == [f"{project['name']}=={project['version']}"]
    assert g["dependencies"] == {}  # ansible.builtin only
    runtime = yaml.safe_load((COLLECTION / "meta/runtime.yml").read_text())
    assert runtime["requires_ansible"].startswith(">=")


def test_tarball_carries_the_top_level_role_plugin_and_playbooks(collection_tarball: Path) -> None:
    names = tar_names(collection_tarball)
    assert {
        "MANIFEST.json",
        "FILES.json",
        "README.md",
        "requirements.txt",
        "meta/runtime.yml",
        "plugins/filter/ipvs_fleet.py",
        "playbooks/site.yml",
        "playbooks/rollback.yml",
        f"{ROLE}/tasks/main.yml",
        f"{ROLE}/defaults/main.yml",
        f"{ROLE}/files/ipvs-dkms-install.sh",
        f"{ROLE}/templates/90-ipvs-fleet.conf.j2",
    } <= names
    # no module swap any more: the fix module loads beside the distro's own ip_vs
    assert f"{ROLE}/files/ipvs-swap.sh" not in names
    # every file of the collection's skeleton and of the top-level role, byte for byte; no
    # build leftovers, no lint config, no policy in the role (the package's, read by the filter)
    role = REPO / "roles" / "ipvs_fleet"
    source = {str(p.relative_to(COLLECTION)): p for p in _files(COLLECTION) if ROLE not in str(p)}
    source |= {f"{ROLE}/{p.relative_to(role)}": p for p in _files(role)}
    assert set(source) - {".ansible-lint", "galaxy.yml"} == names - {"MANIFEST.json", "FILES.json"}
    assert not [n for n in names if "/policy/" in n]
    with tarfile.open(collection_tarball) as t:
        manifest = json.load(t.extractfile("MANIFEST.json"))  # type: ignore[arg-type]
        for name in names - {"MANIFEST.json", "FILES.json"}:
            assert t.extractfile(name).read() == source[name].read_bytes(), name  # type: ignore[union-attr]
    assert manifest["collection_info"]["version"] == galaxy()["version"]


def _files(top: Path) -> list[Path]:
    return [
        p
        for p in top.rglob("*")
        if p.is_file()
        and not p.is_symlink()
        and "__pycache__" not in p.parts
        and ".ansible" not in p.parts
    ]


def test_the_role_source_is_the_top_level_role() -> None:
    """roles/ipvs_fleet is the role; the checkout's collection reaches it by a link (so
    `ansible-playbook ipvs_fleet.fleet.site` runs it from the checkout), the policy is not in it."""
    role = REPO / "roles" / "ipvs_fleet"
    assert (role / "tasks" / "main.yml").is_file() and not role.is_symlink()
    link = COLLECTION / ROLE
    assert link.is_symlink() and link.resolve() == role
    assert not (role / "policy").exists()
    assert resources.policy_file() == resources.data_path("policy/host_classes.yml")
    assert resources.policy_file().resolve() == REPO / "policy" / "host_classes.yml"


def test_installed_collection_playbooks_parse_by_fqcn(installed_collection, tmp_path) -> None:
    r = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "--syntax-check",
            "ipvs_fleet.fleet.site",
            "ipvs_fleet.fleet.rollback",
        ],
        cwd=tmp_path,
        env=collection_env(installed_collection),
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
    }
    inv.write_text(json.dumps({"all": {"hosts": {"bad": dict(local, ipvs_host_class="web")}}}))
    r = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inv), "ipvs_fleet.fleet.site", "--check"],
        cwd=tmp_path,
        env=collection_env(installed_collection),
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "host bad: unknown host class 'web'" in out
    assert "Roll out in waves" not in out


@pytest.mark.parametrize("tag", ["preflight", "install", "configure", "activate", "verify"])
def test_each_phase_has_its_tag(installed_collection, tmp_path, tag: str) -> None:
    r = subprocess.run(
        [
            str(BIN / "ansible-playbook"),
            "-i",
            "localhost,",
            "--list-tasks",
            "--tags",
            tag,
            "ipvs_fleet.fleet.site",
        ],
        cwd=tmp_path,
        env=collection_env(installed_collection),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    tasks = [ln.strip() for ln in r.stdout.splitlines() if "TAGS: [" in ln]
    own = [t for t in tasks if f"{tag}" in t.split("TAGS: [")[1] and "always" not in t]
    assert own or tag == "preflight", r.stdout
    # the plan and the state read run whatever the tag: every phase decides from them
    assert any("Read the host's IPVS state" in t for t in tasks), r.stdout


def test_installed_collection_checks_its_arguments_at_the_role_entry(
    installed_collection, tmp_path
) -> None:
    """meta/argument_specs.yml: a sysctl out of the policy schema's range (or not in it) is
    refused by Ansible's own validation when the role starts, before any filter or host."""
    inv = tmp_path / "inv.yml"
    local = {
        "ansible_connection": "local",
        "ansible_python_interpreter": sys.executable,
        "ansible_become": False,
        "ipvs_host_class": "k8s_node",
    }
    hosts = {
        "range": dict(local, ipvs_sysctls={"conn_reuse_mode": 7}),
        "key": dict(local, ipvs_sysctls={"no_such_key": 1}),
    }
    for host, data in hosts.items():
        inv.write_text(json.dumps({"all": {"hosts": {host: data}}}))
        r = subprocess.run(
            [str(BIN / "ansible-playbook"), "-i", str(inv), "ipvs_fleet.fleet.site", "--check"],
            cwd=tmp_path,
            env=collection_env(installed_collection),
            capture_output=True,
            text=True,
            timeout=300,
        )
        out = r.stdout + r.stderr
        assert r.returncode != 0, out
        assert "Validating arguments against arg spec" in out, out
        assert ("conn_reuse_mode" if host == "range" else "no_such_key") in out, out
        assert "Read the kernel release" not in out, out
