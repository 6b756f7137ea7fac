"""The wheel is self-contained: it carries the role, checks, deploy files and policy, and
the resolver, imported from the unpacked wheel in a directory outside the checkout, finds
them there. Offline: the wheel is built without isolation, nothing is installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ipvs_fleet import kernel, resources
from ipvs_fleet.policy import load_policy
from tests.fixtures.wheel import (
    REPO,
    RESOLVER_PROBE,
    build_wheel,
    expected_data_files,
    wheel_names,
)

ROLE = "data/ansible_collections/ipvs_fleet/fleet/roles/ipvs_fleet"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_every_packaged_file(wheel: Path) -> None:
    names = wheel_names(wheel)
    expected = expected_data_files()
    assert "ipvs_fleet/data/policy/host_classes.yml" in expected
    assert f"ipvs_fleet/{ROLE}/tasks/main.yml" in expected
    assert f"ipvs_fleet/{ROLE}/templates/90-ipvs-fleet.conf.j2" in expected
    assert "ipvs_fleet/data/ansible_collections/ipvs_fleet/fleet/galaxy.yml" in expected
    assert "ipvs_fleet/data/ansible_collections/ipvs_fleet/fleet/playbooks/site.yml" in expected
    assert sorted(expected - names) == []
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]
    # the package data is these files, the package's modules and the kernel sources, no more
    data = {n for n in names if n.startswith("ipvs_fleet/data/")}
    assert sorted(data - expected) == []


def test_unpacked_wheel_finds_its_own_files(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    user = tmp_path / "fleet-repo"
    user.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPVS_FLEET_")}
    r = subprocess.run(
        [sys.executable, "-c", RESOLVER_PROBE],
        cwd=user,
        env={**env, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    pkg = site / "ipvs_fleet"
    assert got["package"] == str(pkg / "__init__.py")
    assert got["policy"] == str(pkg / "data/policy/host_classes.yml")
    assert got["classes"] == sorted(load_policy().classes)
    assert got["templates"] == sorted(os.listdir(resources.templates_dir()))
    assert got["dkms"] == str(pkg / ROLE / "files/ipvs-dkms-install.sh")
    assert got["checks"] == sorted(p.name for p in (REPO / "checks").glob("*.py"))
    assert got["deploy"] == str(pkg / "data/deploy.py")
    dkms = resources.host_script("ipvs-dkms-install.sh")
    assert Path(got["dkms"]).read_bytes() == dkms.read_bytes()
    # The fix module's source ships: a build (or a DKMS tree) from the installed package
    # makes the same module, with the same set id, as one from the checkout.
    assert got["module"] == [str(pkg / "kernel/module" / p.name) for p in kernel.module_sources()]
    assert got["set_id"] == kernel.set_id(kernel.module_sources())
    assert wheel.name.startswith(f"ipvs_fleet-{got['version']}-")
