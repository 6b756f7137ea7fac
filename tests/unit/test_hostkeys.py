"""SSH host keys are checked strictly for every inventory unless the inventory (or the user,
with --data) says otherwise: the inventory's own `all` group (ipvs_fleet.hostkeys), read from
any working directory, and the repository's group_data, loaded the way the pyinfra CLI loads
them; the deploy's refusal of a host whose data set nothing. (On real SSH:
tests/lab/test_host_keys.py, tests/lab/test_preview.py.)"""

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


def test_init_s_inventory_is_strict_from_any_working_directory(tmp_path):
    # issue 31: `pyinfra /srv/fleet/inventory/prod.py ...` from `/` (cron, CI) read no
    # group_data and trusted a new key on first use. The inventory itself carries it now.
    from ipvs_fleet.userrepo import init_repo

    repo = tmp_path / "fleet-repo"
    init_repo(repo)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for cwd in (elsewhere, repo):
        got = checking(repo / "inventory" / "prod.py", cwd)
        assert got and set(got.values()) == {"yes"}, (cwd, got)


def test_the_helper_makes_every_host_strict_and_an_explicit_setting_wins(tmp_path):
    p = tmp_path / "inv.py"
    p.write_text(
        "from ipvs_fleet.hostkeys import strict_host_keys\n"
        + INVENTORY
        + "other = ['h4', 'h1']\n"
        + "globals().update(strict_host_keys(globals()))\n"
    )
    got = checking(p, tmp_path)
    assert got == {"h1": "yes", "h2": "accept-new", "h3": "no", "h4": "yes"}
    override = {"ssh_strict_host_key_checking": "accept-new"}
    assert set(checking(p, tmp_path, override=override).values()) == {"accept-new"}


def test_the_helper_keeps_the_inventorys_own_all_group(tmp_path):
    from ipvs_fleet.hostkeys import strict_host_keys

    own = {"all": (["a", "b"], {"ssh_strict_host_key_checking": "no", "x": 1})}
    assert strict_host_keys(own) == {
        "all": (["a", "b"], {"ssh_strict_host_key_checking": "no", "x": 1})
    }
    groups = {"g": [("a", {}), "b"], "h": (["b", "c"], {}), "_private": ["z"], "n": 3}
    assert strict_host_keys(groups) == {
        "all": (["a", "b", "c"], {"ssh_strict_host_key_checking": "yes"})
    }
    # ipvs_fleet.ansible_inventory's shape: `all` a list of (host, data)
    ansible = {"all": [("a", {"ssh_port": 22})], "k8s": [("a", {})]}
    assert strict_host_keys(ansible) == {
        "all": ([("a", {"ssh_port": 22})], {"ssh_strict_host_key_checking": "yes"})
    }


def test_the_deploy_refuses_an_ssh_host_whose_inventory_set_nothing():
    from ipvs_fleet.hostkeys import unchecked

    why = unchecked("h1", None, "/srv/kh")
    assert why is not None
    assert why.startswith("host h1: SSH host keys are not checked strictly")
    assert "ssh_strict_host_key_checking" in why and "/srv/kh" in why
    assert "~/.ssh/known_hosts" in (unchecked("h1", None, None) or "")
    for asked in ("yes", "accept-new", "no", "off", "ask"):
        assert unchecked("h1", asked, None) is None, asked
