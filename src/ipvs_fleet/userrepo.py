"""ipvs-fleet init DIR: start a fleet repository that uses the installed ipvs-fleet.

The repository holds only what is the user's: the inventory, the policy (a copy of the
packaged defaults to edit), waivers, and the deploy files that call the packaged deploy.
Everything else (templates, host scripts, checks, kernel patches) stays in the package.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.resources import HOST_CLASSES, ROLLOUT, data_path, default_policy_dir

# Repository path -> packaged source; every file comes from the package data, so a new
# repository starts from exactly what the installed version ships.
SKELETON: dict[str, Path] = {
    "deploy.py": Path("deploy.py"),
    "deploy/rollback.py": Path("deploy/rollback.py"),
    "group_data/all.py": Path("group_data/all.py"),
    "inventory/prod.py": Path("user_repo/inventory/prod.py"),
    "waivers.yml": Path("user_repo/waivers.yml"),
    ".envrc": Path("user_repo/.envrc"),
}
POLICY_FILES = (HOST_CLASSES, ROLLOUT)


def skeleton() -> dict[str, Path]:
    """Each file `init` writes (relative path) and the packaged file it copies."""
    out = {rel: data_path(src) for rel, src in SKELETON.items()}
    out.update({f"policy/{name}": default_policy_dir() / name for name in POLICY_FILES})
    return out


def init_repo(target: Path, force: bool = False) -> list[Path]:
    """Write the skeleton into `target`; refuse to overwrite a file unless `force`."""
    files = skeleton()
    existing = [rel for rel in files if (target / rel).exists()]
    if existing and not force:
        raise ConfigError(f"{target}: would overwrite {', '.join(sorted(existing))} (use --force)")
    written = []
    for rel, src in files.items():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        written.append(dest)
    return written


def run(args: argparse.Namespace) -> int:
    for path in init_repo(args.dir, args.force):
        print(path)
    print(
        f"\nnext: cd {args.dir} && . ./.envrc; edit inventory/prod.py and policy/; then\n"
        "  pyinfra inventory/prod.py deploy.py        # preview, then it asks\n"
        "  ipvs-fleet check inventory/prod.py --waivers waivers.yml"
    )
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "init",
        help="write a fleet repository (inventory, policy, waivers, deploy.py) into DIR",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dir", type=Path, help="the repository directory (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that exist")
    p.set_defaults(func=run)
