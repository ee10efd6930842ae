"""Subcommands of ``libmoe`` (one module each, discovered by :mod:`libmoe_core.cli`)."""
