"""Secrets in host data (passwords) and their masking wherever ipvs-fleet prints or logs.

>>> is_secret("_sudo_password"), is_secret("ansible_become_pass"), is_secret("ssh_user")
(True, True, False)
>>> mask("sudo -S <<< hunter2", ["hunter2"])
'sudo -S <<< ***'
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
# pyinfra's _sudo_password, _su_password, ssh_password, ssh_key_password; Ansible's
# ansible_password, ansible_become_password, ansible_become_pass, ansible_ssh_pass.
SECRET_KEY = re.compile(r"(password|passwd|passphrase|_pass)$", re.I)


def is_secret(key: object) -> bool:
    """Whether a host data key holds a secret."""
    return bool(SECRET_KEY.search(str(key)))


def split_secrets(data: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the plain items, the secret items) of `data`."""
    plain = {k: v for k, v in data.items() if not is_secret(k)}
    return plain, {k: v for k, v in data.items() if is_secret(k)}


def secret_values(*datas: Mapping[str, Any]) -> list[str]:
    """The non-empty values of the secret keys of `datas`, longest first (so that one secret
    inside another is masked whole)."""
    vals = {str(v) for d in datas for k, v in d.items() if is_secret(k) and v not in (None, "")}
    return sorted(vals, key=len, reverse=True)


def mask(text: str, secrets: Iterable[str]) -> str:
    """`text` with every occurrence of each secret replaced by ***."""
    for s in secrets:
        if s:
            text = text.replace(s, MASK)
    return text


def masked_data(data: Any) -> Any:
    """A copy of `data` (nested dicts and lists) with the value of every secret key ***."""
    if isinstance(data, Mapping):
        return {
            k: MASK if is_secret(k) and v not in (None, "") else masked_data(v)
            for k, v in data.items()
        }
    if isinstance(data, list | tuple):
        return type(data)(masked_data(x) for x in data)
    return data


def masked_argv(argv: Iterable[str]) -> list[str]:
    """A command line with the value of each `KEY=VALUE` word of a secret key ***
    (`--data _sudo_password=x` -> `--data _sudo_password=***`)."""
    out = []
    for word in argv:
        key, sep, value = str(word).partition("=")
        out.append(f"{key}={MASK}" if sep and value and is_secret(key.lstrip("-")) else word)
    return out


# `key: value`, `key=value`, `"key": "value"` where the key names a secret (YAML, INI, JSON)
_ASSIGNED = re.compile(
    r"""(["']?[\w.-]*(?:password|passwd|passphrase|_pass)["']?\s*[:=]\s*)([^\s,}\]]+)""", re.I
)


def mask_assignments(text: str) -> str:
    """`text` (a tool's message quoting a file we could not parse, so its secrets are
    unknown) with the value of every secret-looking assignment ***."""
    return _ASSIGNED.sub(lambda m: m.group(1) + MASK, text)
