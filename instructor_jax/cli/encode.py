"""`instructor-jax encode`: a corpus file into embeddings (one process, or one shard per process), and
`--merge` of a multi-process run's shards."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from instructor_jax.checkpoints.pooling_evidence import add_pooling_rule_argument
from instructor_jax.model.config import ATTENTION_NAMES
from instructor_jax.runtime.process_flags import add_multiprocess_arguments, join_processes


def add_parser(commands) -> None:
    encode = commands.add_parser(
        "encode", help="embed a JSONL or text file into a .npy (one process, or one shard per process)",
        description="Embeds every line of INPUT: JSONL ({\"instruction\": ..., \"text\": ..., \"id\": ...} per "
                    "line) or plain text (one text per line, with --instruction). Streams in chunks; writes "
                    "OUTPUT.partial and renames it to OUTPUT at the end; --resume continues an interrupted run. "
                    "Run as several processes (the multi-process flags below, or a TPU slice / SLURM step), each "
                    "process encodes a contiguous share of INPUT into its own shard (emb.npy -> "
                    "emb-00000-of-00004.npy, ...) and process 0 writes emb.manifest.json once all are done; "
                    "read them with instructor_jax.open_embeddings, or merge them with --merge. INPUT and "
                    "OUTPUT may be gs:// URLs.")
    encode.add_argument("--model", help="model directory or hub id (required unless --merge)")
    encode.add_argument("--input", help="a .jsonl file, or a text file with one text per line (required unless "
                                        "--merge)")
    encode.add_argument("--output", help="the .npy to write ([n, dim], input order; required unless --merge); "
                                         "several processes write its shards and a manifest beside it")
    encode.add_argument("--instruction", help="instruction for lines that give none (required for text input)")
    encode.add_argument("--format", choices=("jsonl", "text"), help="input format (default: .jsonl/.json -> jsonl)")
    encode.add_argument("--ids", help="also write each row's id (JSONL 'id', else the line number), one per line; "
                                      "with --merge: where the merged ids go (default OUT.ids.txt)")
    encode.add_argument("--batch_size", type=int, default=64, help="rows per device batch (default 64)")
    encode.add_argument("--chunk_size", type=int, default=8192, help="lines read, sorted and written at a time")
    encode.add_argument("--buckets", help="comma-separated padded lengths (default: 16,32,64,128,192,...,max)")
    encode.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the model's)")
    encode.add_argument("--model_dtype", choices=("float32", "bfloat16"), help="dtype to load the weights in")
    encode.add_argument("--attention", choices=ATTENTION_NAMES,
                        help="attention implementation (default xla; cudnn: NVIDIA GPUs with --dtype bfloat16; "
                             "pallas_tpu: TPUs; auto: what the device checks measured faster, today xla; see "
                             "docs/attention.md)")
    encode.add_argument("--store_dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the rows written (default float32; 16 bits halve the size, a cosine moves "
                             "by ~1e-3 at most; bfloat16 .npy files hold numpy's 2-byte void '<V2': "
                             "open_embeddings reads them as ml_dtypes.bfloat16)")
    encode.add_argument("--no_normalize", action="store_true", help="skip the final L2 normalization")
    encode.add_argument("--skip_bad_lines", "--skip-bad-lines", action="store_true",
                        help="skip malformed lines (counted) instead of stopping")
    encode.add_argument("--resume", action="store_true",
                        help="continue an interrupted run of the same command (each shard where it stopped; "
                             "finished shards are kept; the same number of processes)")
    encode.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT (or manifest and shards)")
    encode.add_argument("--quiet", action="store_true", help="no progress bar")
    encode.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                        help="pack several texts per row: auto (default) where that computes fewer FLOPs than "
                             "padding each text to its length bucket; off for embeddings that do not depend on "
                             "the other texts even at float rounding")
    encode.add_argument("--merge", nargs=2, metavar=("MANIFEST", "OUT.npy"),
                        help="instead of encoding: write the shards a manifest lists as one .npy (and their ids, "
                             "to --ids or OUT.ids.txt), streamed, renamed into place at the end")
    add_pooling_rule_argument(encode)
    add_multiprocess_arguments(encode, "encodes a contiguous share of INPUT into its own shard")
    encode.set_defaults(run=run)


def run(args) -> None:
    if args.merge:
        return _merge(args)
    missing = [f"--{name}" for name in ("model", "input", "output") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"encode needs {', '.join(missing)} (or --merge MANIFEST OUT.npy to merge the shards of "
                         "a multi-process run)")
    # Before anything may touch a JAX backend: one process of several joins the others.
    processes = join_processes(args)

    import shlex
    import time

    from instructor_jax import Instructor
    from instructor_jax.encode import corpus_shards
    from instructor_jax.encode.corpus import (check_buckets, check_format, check_outputs, default_format,
                                              encode_corpus, is_input_file)
    from instructor_jax.runtime.interrupts import EXIT_CODE as INTERRUPTED_EXIT_CODE
    from instructor_jax.runtime.interrupts import Interrupted

    # Everything that can be checked without the model is, before it loads (checks of this host's files
    # run inside encode_sharded, so that every process hears of another's failure).
    for name in ("batch_size", "chunk_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    buckets = None
    if args.buckets:
        try:
            buckets = tuple(int(b) for b in args.buckets.split(","))
        except ValueError:
            raise ValueError(f"--buckets must be comma-separated integers such as 64,128,512, got {args.buckets!r}") from None

    def load_model():
        model = Instructor.from_pretrained(args.model, dtype=args.model_dtype, pooling_rule=args.pooling_rule,
                                           attention=args.attention)
        if buckets is not None:
            model.buckets = check_buckets(buckets, model.config.max_seq_length)
        return model

    settings = dict(instruction=args.instruction, fmt=args.format, ids_path=args.ids, batch_size=args.batch_size,
                    chunk_size=args.chunk_size, dtype=args.dtype, normalize=not args.no_normalize,
                    skip_bad_lines=args.skip_bad_lines, resume=args.resume, overwrite=args.overwrite,
                    show_progress_bar=not args.quiet, packing={"auto": None, "on": True, "off": False}[args.packing],
                    store_dtype=args.store_dtype)
    again = ["instructor-jax", *args.argv, *([] if args.resume else ["--resume"])]
    start = time.perf_counter()
    if processes > 1:
        group = corpus_shards.ProcessGroup.from_jax(gather=_gather_stopping_on_sigterm)
        try:
            with _sigterm_stops_encode():
                result = corpus_shards.encode_sharded(load_model, args.input, args.output, group, **settings)
        except KeyboardInterrupt:
            shard = _partial_of(corpus_shards.embedding_store.shard_path(args.output, group.index, group.count))
            print(f"instructor-jax encode: interrupted; the rows encoded so far are kept in {shard}. To "
                  f"continue, rerun every process with --resume: {shlex.join(again)}", file=sys.stderr, flush=True)
            sys.stdout.flush()
            # Not the normal exit: jax.distributed's shutdown would wait at a barrier for the other processes,
            # which go on encoding (or wait for this one at their next allgather). The files are closed.
            os._exit(INTERRUPTED_EXIT_CODE)
        seconds = time.perf_counter() - start
        done = "finished before, kept" if result.skipped else f"{result.progress.rows_done} embeddings"
        print(f"process {group.index} of {group.count}: wrote {result.shard} ({done}) in {seconds:.1f}s")
        if group.index == 0:
            print(f"wrote {result.manifest}: {result.rows_total} embeddings in {group.count} shards; read them with "
                  f"instructor_jax.open_embeddings({result.manifest!r}), or write one file with "
                  f"instructor-jax encode --merge {shlex.quote(result.manifest)} OUT.npy")
        return

    if not is_input_file(args.input):
        raise FileNotFoundError(f"--input {args.input} does not exist or is not a file")
    check_outputs(args.output, args.ids, args.overwrite, args.resume, input_path=args.input)
    check_format(args.format or default_format(args.input), args.instruction)
    # Shards or a manifest of a multi-process run are not continued, nor mixed in, by a single process.
    corpus_shards.check_process_count(args.output, args.ids, 1)
    model = load_model()
    try:
        progress = encode_corpus(model, args.input, args.output, **settings)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; the rows encoded so far are kept in {_partial_of(args.output)}. "
                          f"To continue: {shlex.join(again)}") from None
    seconds = time.perf_counter() - start
    print(f"wrote {args.output}: {progress.rows_done} embeddings of dim {model.dim} in {seconds:.1f}s "
          f"({progress.rows_done / max(seconds, 1e-9):.1f}/s; {model.compile_count} programs compiled)")


def _partial_of(output) -> str:
    """Where an interrupted encode to `output` keeps its rows (a URL's: in this host's staging directory)."""
    from instructor_jax.encode import corpus
    from instructor_jax.runtime import fileio

    return f"{corpus.staging_path(output) if fileio.is_url(output) else output}.partial"


@contextlib.contextmanager
def _sigterm_stops_encode():
    """SIGTERM stops a multi-process encode as Ctrl-C does (partial files kept, lock released).

    jax.distributed's preemption manager takes SIGTERM over, for training's checkpoint at a step all
    processes agree on; an encode has no such step (its partial files are resumable after every chunk), and
    with the signal taken a launcher or scheduler could not stop it at all."""
    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _gather_stopping_on_sigterm(value):
    """corpus_shards' allgather, during which SIGTERM ends the process at once: blocked in the collective
    (waiting, maybe, for a process that died), Python would never run a handler, and nothing is left open."""
    from instructor_jax.encode import corpus_shards

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        return corpus_shards.allgather_json(value)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _merge(args) -> None:
    from instructor_jax.encode import embedding_store

    given = [f"--{name}" for name in ("model", "input", "output") if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--merge reads a finished run's manifest; it takes no {', '.join(given)}")
    source, output = args.merge
    ids_output = args.ids
    if ids_output is None and embedding_store.open_embeddings(source).has_ids:
        ids_output = embedding_store.default_merged_ids(output)
    view = embedding_store.merge(source, output, ids_output, overwrite=args.overwrite, show_progress_bar=not args.quiet)
    also = f" and {ids_output}" if ids_output is not None else ""
    print(f"wrote {output}{also}: {len(view)} embeddings of dim {view.shape[1]} ({view.dtype}) from "
          f"{len(view.parts)} shard(s)")

