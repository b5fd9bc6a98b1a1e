"""`apd-jax`, the command line: `app` builds the parser and runs a subcommand; each other module
here is one subcommand (or what they share: `common`, `options`)."""

from apd_jax.cli.app import main

__all__ = ["main"]
