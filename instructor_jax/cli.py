"""The `instructor-jax` command: subcommands `convert` and `demo` (encode and train come with their issues)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from instructor_jax.weights import WeightsError

# Errors that mean "the input is wrong": shown as one line, without a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError, WeightsError)


def _convert(args) -> None:
    import time

    from instructor_jax.convert import convert

    start = time.perf_counter()
    direction = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {args.dst} ({'instructor-jax' if direction == 'jax' else 'sentence-transformers / PyTorch'} "
          f"format) in {time.perf_counter() - start:.1f}s")


def _demo(args) -> None:
    from instructor_jax.demo import run_demo

    if not run_demo(args.workdir):
        raise SystemExit(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructor-jax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint between sentence-transformers/PyTorch and instructor-jax",
        description="Converts SRC into DST. The direction follows from SRC (a sentence-transformers directory "
                    "becomes instructor-jax, an instructor-jax one becomes sentence-transformers) unless --to "
                    "says otherwise. DST is written under a temporary name and renamed at the end.")
    convert.add_argument("src", help="source directory")
    convert.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    convert.add_argument("--to", choices=("jax", "pytorch"), help="target format (default: inferred from SRC)")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    convert.set_defaults(run=_convert)

    demo = commands.add_parser("demo", help="build a tiny model, convert it both ways, show PyTorch parity")
    demo.add_argument("--workdir", help="where to write the demo's models (default: a temporary directory)")
    demo.set_defaults(run=_demo)
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        args.run(args)
    except USER_ERRORS as e:
        if os.environ.get("INSTRUCTOR_JAX_DEBUG"):
            raise
        print(f"instructor-jax {args.command}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
