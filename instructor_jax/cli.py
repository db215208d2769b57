"""The `instructor-jax` command: subcommands `train`, `encode`, `convert` and `demo`."""

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


def _encode(args) -> None:
    import time

    from instructor_jax import Instructor
    from instructor_jax.corpus import encode_corpus

    model = Instructor.from_pretrained(args.model, dtype=args.model_dtype)
    if args.buckets:
        model.buckets = tuple(int(b) for b in args.buckets.split(","))
    start = time.perf_counter()
    progress = encode_corpus(model, args.input, args.output, instruction=args.instruction, fmt=args.format,
                             ids_path=args.ids, batch_size=args.batch_size, chunk_size=args.chunk_size,
                             dtype=args.dtype, normalize=not args.no_normalize,
                             skip_bad_lines=args.skip_bad_lines, resume=args.resume, overwrite=args.overwrite,
                             show_progress_bar=not args.quiet)
    seconds = time.perf_counter() - start
    print(f"wrote {args.output}: {progress.rows_done} embeddings of dim {model.dim} in {seconds:.1f}s "
          f"({progress.rows_done / max(seconds, 1e-9):.1f}/s; {model.compile_count} programs compiled)")


def _train(args) -> None:
    from instructor_jax import distributed

    # Before gin or anything else may touch a JAX backend: one process of several joins the others.
    distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                           process_id=args.process_id)

    import gin

    from instructor_jax.train import TrainConfig, train

    gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings)
    train(args.workdir, TrainConfig())


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

    encode = commands.add_parser(
        "encode", help="embed a JSONL or text file into a .npy",
        description="Embeds every line of INPUT: JSONL ({\"instruction\": ..., \"text\": ..., \"id\": ...} per "
                    "line) or plain text (one text per line, with --instruction). Streams in chunks; writes "
                    "OUTPUT.partial and renames it to OUTPUT at the end; --resume continues an interrupted run.")
    encode.add_argument("--model", required=True, help="model directory or hub id")
    encode.add_argument("--input", required=True, help="a .jsonl file, or a text file with one text per line")
    encode.add_argument("--output", required=True, help="the .npy to write (float32 [n, dim], input order)")
    encode.add_argument("--instruction", help="instruction for lines that give none (required for text input)")
    encode.add_argument("--format", choices=("jsonl", "text"), help="input format (default: .jsonl/.json -> jsonl)")
    encode.add_argument("--ids", help="also write each row's id (JSONL 'id', else the line number), one per line")
    encode.add_argument("--batch_size", type=int, default=64, help="rows per device batch (default 64)")
    encode.add_argument("--chunk_size", type=int, default=8192, help="lines read, sorted and written at a time")
    encode.add_argument("--buckets", help="comma-separated padded lengths (default: 16,32,64,128,192,...,max)")
    encode.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the model's)")
    encode.add_argument("--model_dtype", choices=("float32", "bfloat16"), help="dtype to load the weights in")
    encode.add_argument("--no_normalize", action="store_true", help="skip the final L2 normalization")
    encode.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                        help="skip malformed lines (counted) instead of stopping")
    encode.add_argument("--resume", action="store_true", help="continue an interrupted run of the same command")
    encode.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.set_defaults(run=_encode)

    train = commands.add_parser(
        "train", help="train an instruction embedder from gin config files",
        description="Trains (or resumes, if WORKDIR holds a checkpoint) as the gin files say. Writes "
                    "WORKDIR/metrics.jsonl, TensorBoard events, orbax checkpoints, and at the end WORKDIR/model "
                    "and WORKDIR/sentence_transformers.")
    train.add_argument("--gin_file", action="append", default=[], help="gin config file (repeatable)")
    train.add_argument("--gin_bindings", action="append", default=[],
                       help="a gin binding such as 'TrainConfig.total_steps = 100' (repeatable)")
    train.add_argument("--workdir", required=True, help="where checkpoints, logs and exports go")
    multi = train.add_argument_group(
        "multi-process", "One process per host (or per GPU), all running the same command. Give all three "
        "flags (or the INSTRUCTOR_JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID environment variables; "
        "a flag and a variable that disagree are an error), or none: then JAX's own detection is used on a "
        "Cloud TPU VM, in a SLURM step of several tasks or an Open MPI job, and otherwise one process runs. "
        "See launch/README.md.")
    multi.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0, reachable from every process, and a free port")
    multi.add_argument("--num_processes", type=int, metavar="N", help="number of processes in the job")
    multi.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0 .. N-1")
    train.set_defaults(run=_train)

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
