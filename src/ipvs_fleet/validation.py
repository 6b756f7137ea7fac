"""Input files as pydantic models: strict types, and errors said as `file: key: problem`.

Every loader (policy, host data, waivers, rollout config, journal) validates its parsed
document with a StrictModel: a string is not a boolean, a list is not a name, an unknown key
is an error. A failed validation becomes one ConfigError naming the file and each bad key
(`waivers.yml: waivers[2].expires: not a valid date: 2026-02-30`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails

from ipvs_fleet.errors import ConfigError

M = TypeVar("M", bound=BaseModel)
MAX_ERRORS = 5  # per message: the first few are enough to fix a file
MAX_REPR = 80


class StrictModel(BaseModel):
    """No coercion ("false" is not false, 1.5 not 1), no unknown keys, frozen."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        """An unknown key is named with the known ones (a typo is then plain to see)."""
        if isinstance(data, dict) and cls.model_config.get("extra") == "forbid":
            known = {f.alias or n for n, f in cls.model_fields.items()}
            unknown = sorted(str(k) for k in data if k not in known)
            if unknown:
                raise ValueError(
                    f"a mapping with keys {', '.join(sorted(known))} "
                    f"(unknown: {', '.join(unknown)})"
                )
        return data


def shown(value: Any) -> str:
    """repr() of a value for a message, cut to a readable length."""
    r = repr(value)
    return r if len(r) <= MAX_REPR else r[: MAX_REPR - 3] + "..."


def dotted(loc: Iterable[int | str]) -> str:
    """A pydantic error location as the key a user reads: `waivers[2].expires`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# What a type error means in the words of a YAML file.
TYPE_WORDS = {
    "bool_type": "must be true or false",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "model_attributes_type": "must be a mapping",
    "list_type": "must be a list",
    "tuple_type": "must be a list",
    "missing": "required",
    "extra_forbidden": "unknown field",
}


def describe(err: ErrorDetails) -> str:
    """One pydantic error, said as the file's problem (no pydantic jargon)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind in ("missing", "extra_forbidden"):
        return TYPE_WORDS[kind]
    if kind == "literal_error":
        return f"{shown(err['input'])} is not one of {ctx.get('expected')}"
    if kind in TYPE_WORDS:
        return f"{TYPE_WORDS[kind]}, got {shown(err['input'])}"
    return f"{err['msg']}, got {shown(err['input'])}"


def invalid(
    e: ValidationError, source: str, key: Callable[[ErrorDetails], str] | None = None
) -> ConfigError:
    """ConfigError for a failed validation: `source: key: problem`, one line per error.

    + key: how an error names its key (a waiver by its host), else the dotted location
    """
    lines: list[str] = []
    for err in e.errors(include_url=False):
        k = key(err) if key else dotted(err["loc"])
        lines.append(f"{source}: {k}: {describe(err)}" if k else f"{source}: {describe(err)}")
    lines = list(dict.fromkeys(lines))
    more = len(lines) - MAX_ERRORS
    return ConfigError("\n".join(lines[:MAX_ERRORS] + ([f"(and {more} more)"] if more > 0 else [])))


def validated(
    model: type[M],
    doc: Any,
    source: str,
    context: Mapping[str, Any] | None = None,
    key: Callable[[ErrorDetails], str] | None = None,
) -> M:
    """`model` from a parsed document, or ConfigError naming `source` and each bad key."""
    try:
        return model.model_validate(doc, context=dict(context or {}))
    except ValidationError as e:
        raise invalid(e, source, key) from None


# Host data the rollout reads (ipvs_fleet.rollout): hosts that must never change together (the
# two directors of a keepalived pair) share a failure domain name.
FAILURE_DOMAIN = "ipvs_failure_domain"
DOMAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_failure_domain(value: Any) -> str:
    """A failure domain name (ValueError otherwise)."""
    if not isinstance(value, str) or not DOMAIN_RE.match(value):
        raise ValueError(
            f"must be a name (letters, digits, '_', '.', '-'; at most 64), got {shown(value)}"
        )
    return value


def failure_domains(hosts: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, str]:
    """{host: domain} of the hosts [(name, data)] with ipvs_failure_domain, or ConfigError
    naming the host and the key."""
    out: dict[str, str] = {}
    for name, data in hosts:
        if data.get(FAILURE_DOMAIN) is None:
            continue
        try:
            out[name] = check_failure_domain(data[FAILURE_DOMAIN])
        except ValueError as e:
            raise ConfigError(f"host {name}: {FAILURE_DOMAIN}: {e}") from None
    return out
