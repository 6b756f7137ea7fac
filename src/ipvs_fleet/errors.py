"""Errors that the CLI reports as a clear message, never a traceback."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


class FleetError(Exception):
    """A user-facing error: what is wrong and where (file, field, host)."""


class ConfigError(FleetError):
    """Invalid input (inventory, fleet file, policy, waiver): nothing was changed."""


@functools.cache
def _yaml_loader() -> type:
    import yaml

    class TextDates(yaml.SafeLoader):
        """SafeLoader that leaves dates as text: the models parse them, so a bad date
        (2026-02-30) is an error naming its key, not a ValueError out of the parser."""

    TextDates.yaml_implicit_resolvers = {
        ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:timestamp"]
        for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }
    return TextDates


def load_yaml_file(path: Path, what: str) -> Any:
    """The parsed YAML of `path` (dates as text); ConfigError naming the file if it is
    unreadable or invalid.

    + what: what the file is, for the message ("policy", "fleet file", ...)
    """
    import yaml

    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: cannot read {what}: not UTF-8 text ({e.reason})") from e
    try:
        return yaml.load(text, Loader=_yaml_loader())  # a SafeLoader
    # ValueError: a scalar its tag cannot hold (`!!int x`); RecursionError: nesting too deep.
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
