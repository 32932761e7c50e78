"""Subcommands of the ``orcd`` CLI, one module each."""
