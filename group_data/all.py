"""Data of pyinfra's `all` group for inventories run from this directory: SSH host keys are
checked strictly unless the inventory (or `--data ssh_strict_host_key_checking=accept-new`)
says otherwise; see ipvs_fleet.hostkeys."""

from pyinfra import inventory

from ipvs_fleet.hostkeys import default_checking

__all__ = ["ssh_strict_host_key_checking"]

ssh_strict_host_key_checking = default_checking(inventory)
