"""The `byol-jax` command: subcommands, flag parsing and dispatch.

command_line.py, the only module that defines flags, reads and checks a command line
(`parse`) and runs nothing. commands.py runs it (`run`): each subcommand is a small
function that reads flags and calls the library; no maths here. `main` is the console
entry point. Bad input exits 2 with its whole message on stderr and no traceback;
`byol-jax --help` and `byol-jax COMMAND --help` print usage.

The names below are the CLI's API; the console script is `byol_jax.cli:main`.
"""
from byol_jax.cli.command_line import COMMAND_FLAGS
from byol_jax.cli.command_line import CommandLine
from byol_jax.cli.command_line import FLAGS
from byol_jax.cli.command_line import UsageError
from byol_jax.cli.command_line import command_usage
from byol_jax.cli.command_line import parse
from byol_jax.cli.commands import COMMANDS
from byol_jax.cli.commands import main
from byol_jax.cli.commands import run

__all__ = ["COMMANDS", "COMMAND_FLAGS", "CommandLine", "FLAGS", "UsageError", "command_usage",
           "main", "parse", "run"]
