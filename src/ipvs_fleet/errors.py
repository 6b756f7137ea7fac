"""Errors that the CLI reports as a clear message, never a traceback."""


class FleetError(Exception):
    """A user-facing error: what is wrong and where (file, field, host)."""


class ConfigError(FleetError):
    """Invalid input (inventory, fleet file, policy, waiver): nothing was changed."""
