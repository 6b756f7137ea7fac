"""The Ansible collection ipvs_fleet.fleet as users get it: its skeleton
(`ansible_collections/ipvs_fleet/fleet`: galaxy.yml, playbooks, the filter) with the role's
source, the top-level `roles/ipvs_fleet`, copied in. In a checkout the skeleton reaches the
role by a symlink, which `ansible-galaxy collection build` would skip (a link to a folder
outside the collection), so the build runs on a copy with the links followed.

    python -m ipvs_fleet.collection --out dist     # dist/ipvs_fleet-fleet-<version>.tar.gz
    python -m ipvs_fleet.collection --sanity       # ansible-test sanity of that tree
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.resources import collection_dir

# Never shipped: caches and ansible-lint's working copy (also galaxy.yml's build_ignore).
IGNORED = ("__pycache__", "*.pyc", ".ansible", "*.tar.gz")


def assemble(dest: Path) -> Path:
    """Copy the collection, the role in it, to `dest`/ansible_collections/ipvs_fleet/fleet (a
    tree `ansible-galaxy collection build` and `ansible-test` work in); its path."""
    target = dest / "ansible_collections" / "ipvs_fleet" / "fleet"
    shutil.copytree(
        collection_dir(), target, symlinks=False, ignore=shutil.ignore_patterns(*IGNORED)
    )
    return target


# ansible-test bootstraps pip in each sanity venv with a script it downloads from
# ci-files.testing.ansible.com; where that host is unreachable (offline CI, this lab machine)
# the interpreter's own ensurepip stands in, saved where ansible-test looks for its cached copy.
GET_PIP_STAND_IN = (
    '"""ipvs-fleet: offline stand-in for ansible-test\'s get-pip.py (pip from ensurepip)."""\n'
    "import ensurepip\n\nensurepip.bootstrap(upgrade=True, default_pip=True)\n"
)
BOOTSTRAP_CACHE = re.compile(r"manually downloaded and saved to: (\S+)")


def _tool(name: str) -> str:
    search = f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"
    found = shutil.which(name, path=search)
    if not found:
        raise ConfigError(f"{name} not found: install ipvs-fleet[ansible]")
    return found


def sanity(python: str = f"{sys.version_info.major}.{sys.version_info.minor}") -> int:
    """`ansible-test sanity` of the assembled collection (ansible-test needs the tree under
    ansible_collections/<namespace>/<name>); its exit code, its report on stdout."""
    test = _tool("ansible-test")
    env = dict(os.environ, PATH=f"{Path(test).parent}:{os.environ.get('PATH', '')}")
    with tempfile.TemporaryDirectory(prefix="ipvs-fleet-sanity-") as tmp:
        src = assemble(Path(tmp))
        for attempt in (1, 2):
            r = subprocess.run(
                [test, "sanity", "--python", python, "--color", "no"],
                cwd=src,
                env=env,
                capture_output=True,
                text=True,
                timeout=1800,
            )
            out = r.stdout + r.stderr
            cache = BOOTSTRAP_CACHE.search(out)
            if r.returncode == 0 or cache is None or attempt == 2:
                break
            Path(cache.group(1)).parent.mkdir(parents=True, exist_ok=True)
            Path(cache.group(1)).write_text(GET_PIP_STAND_IN)
    # the test names and their findings, not pip's install chatter
    keep = ("Running sanity test", "ERROR", "FATAL", "WARNING: Reviewing", "See documentation")
    print("\n".join(ln for ln in out.splitlines() if ln.startswith(keep)))
    return r.returncode


def tarball_name(collection: Path) -> str:
    g = yaml.safe_load((collection / "galaxy.yml").read_text())
    return f"{g['namespace']}-{g['name']}-{g['version']}.tar.gz"


def build(out: Path) -> Path:
    """`ansible-galaxy collection build` of the assembled collection into `out`: the tarball."""
    galaxy = _tool("ansible-galaxy")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ipvs-fleet-collection-") as tmp:
        src = assemble(Path(tmp))
        r = subprocess.run(
            [galaxy, "collection", "build", "--force", "--output-path", str(out), str(src)],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, ANSIBLE_NOCOLOR="1"),
        )
        if r.returncode != 0:
            raise ConfigError(f"ansible-galaxy collection build failed:\n{r.stdout}{r.stderr}")
        return out / tarball_name(src)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ipvs_fleet.collection", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("dist"), help="folder for the tarball")
    ap.add_argument("--sanity", action="store_true", help="run ansible-test sanity instead")
    args = ap.parse_args(argv)
    try:
        if args.sanity:
            return sanity()
        print(build(args.out))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
