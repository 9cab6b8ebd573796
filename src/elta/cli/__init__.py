"""The ``elta`` command line: one entry point, one short function per subcommand.

Exit status: 0 done; 1 finished but found problems (``data check``, ``predict`` with no readable image);
2 a usage or input error, printed as one line ``elta COMMAND: error: MESSAGE``; 130 interrupted. Any other
exception is a bug and shows its traceback. Heavy modules (torch) are imported inside the commands, so
``elta --help`` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from elta import launch
from elta.cli import data, export, score, serve, train
from elta.errors import ConfigError, EltaError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elta", description="Long-tail-aware image aesthetics assessment.")
    _add_verbosity(parser, default=0)
    parser.add_argument("--version", action="version", version=f"elta {__import__('elta').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for commands in (train, score, data, serve, export):
        commands.add_commands(sub)
    for command in _subparsers(parser):
        _add_verbosity(command, default=argparse.SUPPRESS)  # -q / -v after the command name too
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, default) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-q", "--quiet", dest="verbosity", action="store_const", const=-1, default=default,
        help="only warnings and errors (no progress)",
    )  # fmt: skip
    group.add_argument(
        "-v", "--verbose", dest="verbosity", action="store_const", const=1, default=default,
        help="debug messages too",
    )  # fmt: skip


def _configure_logging(level: int) -> None:
    """The console (standard error) shows ``level`` and above; elta's logger passes INFO on regardless, so that
    a run's train.log is complete under -q too."""
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # the console basicConfig set up
            handler.setLevel(level)
    logging.getLogger("elta").setLevel(min(level, logging.INFO))


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every subcommand's parser, nested ones (``data check``) included."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                found += [command, *_subparsers(command)]
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbosity = -1 if launch.rank() > 0 else args.verbosity  # under torchrun rank 0 reports progress
    _configure_logging({-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[verbosity])
    try:
        if launch.launched_by_torchrun() and args.command not in ("train", "predict"):
            raise ConfigError(
                "under torchrun only `elta train` and `elta predict` run distributed; run this command "
                "without torchrun"
            )
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (EltaError, OSError) as exc:
        print(f"elta {args.command}: error: {exc}", file=sys.stderr)
        return 2
