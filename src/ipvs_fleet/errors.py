"""Errors that the CLI reports as a clear message, never a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class FleetError(Exception):
    """A user-facing error: what is wrong and where (file, field, host)."""


class ConfigError(FleetError):
    """Invalid input (inventory, fleet file, policy, waiver): nothing was changed."""


def load_yaml_file(path: Path, what: str) -> Any:
    """The parsed YAML of `path`; ConfigError naming the file if it is unreadable or invalid.

    + what: what the file is, for the message ("policy", "fleet file", ...)
    """
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
