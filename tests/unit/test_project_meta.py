"""Project metadata: one version, the licence, the typing marker, in the tree and the wheel."""

from __future__ import annotations

import ast
import re
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

import ipvs_fleet
from ipvs_fleet.probe import GUEST_FILES
from tests.fixtures.wheel import REPO, build_wheel

PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GALAXY_FILES = sorted(REPO.glob("ansible_collections/*/*/galaxy.yml"))


def test_the_version_is_written_once() -> None:
    # the package reads its version from the installed metadata, i.e. from pyproject.toml
    tree = ast.parse(Path(ipvs_fleet.__file__).read_text())
    literals = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and re.fullmatch(r"\d+\.\d+\.\d+", n.value)
    ]
    assert literals == []
    assert ipvs_fleet.__version__ == version("ipvs-fleet") == PROJECT["version"]


def test_galaxy_and_pins_carry_the_package_version() -> None:
    assert GALAXY_FILES
    for path in GALAXY_FILES:
        assert yaml.safe_load(path.read_text())["version"] == ipvs_fleet.__version__, path
    pins = re.findall(r"ipvs-fleet==([\w.+-]+)", (REPO / "ci-examples/gitlab-ci.yml").read_text())
    for path in GALAXY_FILES:
        req = path.parent / "requirements.txt"
        if req.exists():
            pins += re.findall(r"ipvs-fleet==([\w.+-]+)", req.read_text())
    assert pins and set(pins) == {ipvs_fleet.__version__}


def test_license_is_the_gpl_2_the_code_declares() -> None:
    text = (REPO / "LICENSE").read_text()
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 2, June 1991" in text
    assert PROJECT["license"] == "GPL-2.0-only"
    assert PROJECT["license-files"] == ["LICENSE"]
    for path in GALAXY_FILES:
        assert yaml.safe_load(path.read_text())["license"] == ["GPL-2.0-only"], path
    module = (REPO / "src/ipvs_fleet/kernel/module/ip_vs_reuse.c").read_text()
    assert 'MODULE_LICENSE("GPL")' in module  # the kernel's "GPL": GPL v2


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_carries_license_typing_marker_and_guest_files(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
    assert "ipvs_fleet/py.typed" in names
    assert meta.replace("METADATA", "licenses/LICENSE") in names
    assert "License-Expression: GPL-2.0-only" in metadata
    assert {f"ipvs_fleet/probe/{n}" for n in GUEST_FILES} <= names
