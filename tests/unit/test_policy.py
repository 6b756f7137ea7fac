"""The host-class policy: valid data loads, bad data names the file, host and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ipvs_fleet.errors import ConfigError
from ipvs_fleet.policy import load_policy
from ipvs_fleet.resources import policy_file


@pytest.fixture
def policy():
    return load_policy()


def test_classes_have_their_knob(policy):
    assert policy.for_host("n", {"ipvs_host_class": "k8s_node"}).knob == 1
    assert policy.for_host("f", {"ipvs_host_class": "ftp"}).knob == 0
    assert policy.for_host("c", {"ipvs_host_class": "connmark"}).knob == 0


def test_drain_hooks_come_from_the_class_or_the_host(tmp_path: Path):
    f = tmp_path / "classes.yml"
    f.write_text(
        "host_classes: {x: {sysctls: {}, pre_activate: 'drain', post_activate: [a, b],"
        " hook_timeout_seconds: 60}}\nsysctl_schema: {a: {min: 0, max: 1}}"
    )
    s = load_policy(f).for_host("h", {"ipvs_host_class": "x"})
    assert (s.pre_activate, s.post_activate, s.hook_timeout) == (("drain",), ("a", "b"), 60)
    s = load_policy(f).for_host(
        "h", {"ipvs_host_class": "x", "ipvs_pre_activate": ["mine"], "ipvs_post_activate": None}
    )
    assert (s.pre_activate, s.post_activate) == (("mine",), ())


def test_lock_wait_comes_from_the_class_or_the_host(tmp_path: Path):
    f = tmp_path / "classes.yml"
    f.write_text(
        "host_classes: {x: {sysctls: {}, lock_wait_seconds: 45}, y: {sysctls: {}}}\n"
        "sysctl_schema: {a: {min: 0, max: 1}}"
    )
    pol = load_policy(f)
    assert pol.for_host("h", {"ipvs_host_class": "x"}).lock_wait == 45
    assert pol.for_host("h", {"ipvs_host_class": "y"}).lock_wait == 300
    assert pol.for_host("h", {"ipvs_host_class": "y", "ipvs_lock_wait_seconds": 5}).lock_wait == 5
    with pytest.raises(ConfigError, match="host h: ipvs_lock_wait_seconds: must be a whole"):
        pol.for_host("h", {"ipvs_host_class": "y", "ipvs_lock_wait_seconds": "5s"})


def test_host_override_merges_over_class(policy):
    s = policy.for_host(
        "n", {"ipvs_host_class": "k8s_node", "ipvs_sysctls": {"conn_reuse_old_conntrack": 0}}
    )
    assert s.sysctls["conn_reuse_old_conntrack"] == 0
    assert s.sysctls["expire_nodest_conn"] == 1
    assert "net.ipv4.vs.conn_reuse_old_conntrack = 0" in s.sysctl_lines()


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({}, ["host h", "no ipvs_host_class"]),
        ({"ipvs_host_class": "web"}, ["host h", "unknown host class 'web'", str(policy_file())]),
        (
            {"ipvs_host_class": "ftp", "ipvs_sysctls": {"conn_reuse_old_conntrack": 2}},
            ["host h", "conn_reuse_old_conntrack=2", "0..1"],
        ),
        (
            {"ipvs_host_class": "ftp", "ipvs_sysctls": {"no_such_key": 1}},
            ["host h", "unknown IPVS sysctl 'no_such_key'"],
        ),
        ({"ipvs_host_class": "ftp", "ipvs_activation": "now"}, ["host h", "'now'", "reload"]),
        ({"ipvs_host_class": "ftp", "ipvs_colour": "red"}, ["host h", "ipvs_colour"]),
        (
            {"ipvs_host_class": "ftp", "ipvs_allow_reuse_with": " "},
            ["host h", "ipvs_allow_reuse_with"],
        ),
        (
            {"ipvs_host_class": "ftp", "ipvs_pre_activate": ["ok", 3]},
            ["host h", "ipvs_pre_activate", "a shell command or a list of them"],
        ),
    ],
)
def test_bad_host_data_is_named(policy, data, words):
    with pytest.raises(ConfigError) as e:
        policy.for_host("h", data)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("host_classes: [", ["not valid YAML"]),
        ("host_classes: {}\nsysctl_schema: {a: {min: 0, max: 1}}", ["host_classes"]),
        (
            "host_classes: {x: {sysctls: {a: 5}}}\nsysctl_schema: {a: {min: 0, max: 1}}",
            ["host_classes.x.sysctls", "a=5"],
        ),
        (
            "host_classes: {x: {sysctls: {}, colour: 1}}\nsysctl_schema: {a: {min: 0, max: 1}}",
            ["host_classes.x", "colour"],
        ),
        (
            "host_classes: {x: {sysctls: {}, hook_timeout_seconds: 0}}\n"
            "sysctl_schema: {a: {min: 0, max: 1}}",
            ["host_classes.x.hook_timeout_seconds", ">= 1"],
        ),
    ],
)
def test_bad_policy_file_is_named(tmp_path: Path, text, words):
    f = tmp_path / "classes.yml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_policy(f)
    assert str(f) in str(e.value)
    for w in words:
        assert w in str(e.value)
