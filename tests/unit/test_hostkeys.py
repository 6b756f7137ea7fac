"""SSH host keys are checked strictly for every inventory unless the inventory (or the user,
with --data) says otherwise: the repository's group_data for pyinfra's `all` group, loaded
the way the pyinfra CLI loads it. (On real SSH: tests/lab/test_preview.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from pyinfra.api import Config, Inventory, State
from pyinfra.context import ctx_state
from pyinfra_cli.inventory import make_inventory_from_files

REPO = Path(__file__).resolve().parents[2]

INVENTORY = """
plain = [("h1", {}), ("h2", {"ssh_strict_host_key_checking": "accept-new"})]
tofu = (["h3"], {"ssh_strict_host_key_checking": "no"})
"""


def checking(inv: Path, cwd: Path, override: dict | None = None, dirs=None) -> dict[str, str]:
    with ctx_state.use(State(Inventory(([], {})), Config())):
        inventory = make_inventory_from_files(
            str(inv), override_data=override, cwd=str(cwd), group_data_directories=dirs
        )
    return {h.name: h.data.get("ssh_strict_host_key_checking") for h in inventory}


@pytest.fixture
def inv(tmp_path: Path) -> Path:
    p = tmp_path / "inv.py"
    p.write_text(INVENTORY)
    return p


def test_strict_by_default_and_the_inventorys_own_setting_wins(inv):
    assert checking(inv, REPO) == {"h1": "yes", "h2": "accept-new", "h3": "no"}


def test_the_inventory_files_all_data_wins_too(tmp_path):
    p = tmp_path / "inv.py"
    p.write_text('all = (["a", "b"], {"ssh_strict_host_key_checking": "accept-new"})\n')
    assert checking(p, REPO) == {"a": "accept-new", "b": "accept-new"}


def test_trust_on_first_use_when_asked_with_data(inv):
    got = checking(inv, REPO, override={"ssh_strict_host_key_checking": "accept-new"})
    assert set(got.values()) == {"accept-new"}


def test_inventories_in_inventory_dir_get_it_from_any_working_directory(inv, tmp_path):
    # pyinfra reads <inventory's dir>/group_data; for inventory/<env>.py that is this one
    dirs = [str(REPO / "inventory" / "group_data")]
    assert checking(inv, tmp_path, dirs=dirs)["h1"] == "yes"
    # and without any of ipvs-fleet's group_data, pyinfra's own default would apply
    assert checking(inv, tmp_path)["h1"] is None
