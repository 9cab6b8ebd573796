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
from elta.cli import data, score, train
from elta.errors import ConfigError, EltaError

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elta", description="Long-tail-aware image aesthetics assessment.")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    parser.add_argument("--version", action="version", version=f"elta {__import__('elta').__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train.add_commands(sub)
    score.add_commands(sub)
    data.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.WARNING)
    quiet = args.quiet or launch.rank() > 0  # under torchrun rank 0 reports progress
    logging.getLogger("elta").setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        if launch.launched_by_torchrun() and args.command != "train":
            raise ConfigError(
                "under torchrun only `elta train` runs distributed; run this command without torchrun"
            )
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (EltaError, OSError) as exc:
        print(f"elta {args.command}: error: {exc}", file=sys.stderr)
        return 2
