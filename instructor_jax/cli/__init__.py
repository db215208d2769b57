"""The `instructor-jax` command: one module per subcommand, each with `add_parser(commands)` and `run(args)`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from instructor_jax.checkpoints.weights import WeightsError
from instructor_jax.cli import convert, data, demo, encode, evaluate, plot, search, serve, train
from instructor_jax.runtime import extras

# Errors that mean "the input is wrong" (or the set-up: a missing extra): one line, no traceback, exit 2.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError, WeightsError,
               extras.MissingExtra)


DESCRIPTION = ("The `instructor-jax` command: subcommands `train`, `encode`, `convert`, `data`, `eval`, `plot`, "
               "`demo`, `serve` and `search`.")
# In the order `--help` lists them.
SUBCOMMANDS = (convert, encode, train, demo, evaluate, plot, data, serve, search)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructor-jax", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)
    for subcommand in SUBCOMMANDS:
        subcommand.add_parser(commands)
    add_verbose_everywhere(commands)
    return parser


def add_verbose_everywhere(commands) -> None:
    """-v after the subcommand too (`instructor-jax encode ... -v`), as errors say "rerun with -v". SUPPRESS:
    a subcommand that was not given -v leaves the top-level value alone."""
    for parser in commands.choices.values():
        parser.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                            help="log at INFO level, and show the traceback of an error")
        for action in parser._subparsers._group_actions if parser._subparsers else ():
            add_verbose_everywhere(action)


def required_extras(args) -> list[str]:
    """The extras a command needs whatever its input, checked before it does any work."""
    # (demo checks its own, in run_demo, which Python callers reach too.)
    needed = {"eval": ["mteb"], "plot": ["plot"], "serve": ["serve"]}.get(args.command, [])
    if args.command == "plot" and getattr(args, "method", None) == "tsne":
        needed = needed + ["tsne"]
    return needed


def _one_line(error: BaseException) -> str:
    return " ".join(" ".join(line.split()) for line in str(error).splitlines() if line.strip())


def main(argv=None) -> None:
    """Every expected failure ends as one line on stderr and a non-zero exit: 2 for bad input (and
    full disks, permissions, locks), 130 for Ctrl-C, 1 for anything unexpected. -v shows the traceback."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    # Which pooling rule a checkpoint got, and why, is worth one line on every load.
    logging.getLogger("instructor_jax.checkpoints.pooling_evidence").setLevel(logging.INFO)
    traceback = args.verbose or bool(os.environ.get("INSTRUCTOR_JAX_DEBUG"))
    try:
        for extra in required_extras(args):
            extras.require(extra, f"instructor-jax {args.command}")
        try:
            args.run(args)
        except ModuleNotFoundError as e:
            # A module one of our extras provides, needed by what this input asked for (TrainConfig.eval_tasks
            # needs mteb, a tfds: train_file tensorflow-datasets, ...): the extra and its pip line, not a bug.
            raise extras.explain(e) or e
    except KeyboardInterrupt as e:
        if traceback:
            raise
        print(f"instructor-jax {args.command}: {_one_line(e) or 'interrupted'}", file=sys.stderr)
        raise SystemExit(130) from None
    except USER_ERRORS as e:
        if traceback:
            raise
        print(f"instructor-jax {args.command}: error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - a bug: still one line, with the way to the details
        if traceback:
            raise
        print(f"instructor-jax {args.command}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with -v "
              "for the traceback, and please report it)", file=sys.stderr)
        raise SystemExit(1) from None

