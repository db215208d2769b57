"""The `instructor-jax` command: subcommands `train`, `encode`, `convert`, `data`, `eval`, `plot` and `demo`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys

from instructor_jax.checkpoints.weights import WeightsError

# Errors that mean "the input is wrong": shown as one line, without a traceback.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, PermissionError, OSError, WeightsError)


def _convert(args) -> None:
    import time

    from instructor_jax.checkpoints.convert import convert
    from instructor_jax.checkpoints.t5x import T5xSettings

    start = time.perf_counter()
    settings = T5xSettings(relative_attention_max_distance=args.relative_attention_max_distance,
                           layer_norm_epsilon=args.layer_norm_epsilon, feed_forward_proj=args.feed_forward_proj,
                           max_seq_length=args.max_seq_length)
    direction = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                        pooling_rule=args.pooling_rule, tokenizer=args.tokenizer, t5x_settings=settings)
    formats = {"jax": "instructor-jax", "pytorch": "sentence-transformers / PyTorch", "t5x": "t5x"}
    print(f"wrote {args.dst} ({formats[direction]} format) in {time.perf_counter() - start:.1f}s")


def _join_processes(args):
    """One process of several joins the others (`--coordinator_address/--num_processes/--process_id`, the
    INSTRUCTOR_JAX_* variables, or JAX's SLURM/Open MPI/TPU detection); a no-op for a single process. Must
    run before anything touches a JAX backend. Returns the number of processes."""
    from instructor_jax.runtime import distributed

    plan = distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                  process_id=args.process_id)
    if plan.mode == "single":
        return 1
    import jax

    return jax.process_count()


def _encode(args) -> None:
    if args.merge:
        return _merge(args)
    missing = [f"--{name}" for name in ("model", "input", "output") if getattr(args, name) is None]
    if missing:
        raise ValueError(f"encode needs {', '.join(missing)} (or --merge MANIFEST OUT.npy to merge the shards of "
                         "a multi-process run)")
    # Before anything may touch a JAX backend: one process of several joins the others.
    processes = _join_processes(args)

    import shlex
    import time

    from instructor_jax import Instructor
    from instructor_jax.encode import corpus_shards
    from instructor_jax.encode.corpus import check_buckets, check_outputs, encode_corpus, is_input_file
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
        model = Instructor.from_pretrained(args.model, dtype=args.model_dtype, pooling_rule=args.pooling_rule)
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
    check_outputs(args.output, args.ids, args.overwrite, args.resume)
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


def _train(args) -> None:
    # Before gin or anything else may touch a JAX backend: one process of several joins the others.
    _join_processes(args)

    import gin

    from instructor_jax.train.loop import TrainConfig, train

    try:
        gin.parse_config_files_and_bindings(args.gin_file, args.gin_bindings)
    except SyntaxError as e:  # gin's parser reports a malformed file or binding as Python syntax
        where = f"{e.filename}, line {e.lineno}" if e.filename else f"line {e.lineno}"
        raise ValueError(f"cannot parse the gin configuration: {e.msg} ({where})") from None
    train(args.workdir, TrainConfig())


def _build_tfds(args) -> None:
    from instructor_jax.train import tfds_medi

    count = tfds_medi.build(args.input, args.data_dir, skip_bad=args.skip_bad_records)
    print(f"built the medi TFDS dataset in {args.data_dir}: {count} records; train with "
          f"TrainConfig.train_file = 'tfds:medi' and TrainConfig.tfds_data_dir = '{args.data_dir}'")


def _demo(args) -> None:
    from instructor_jax.demo import run_demo

    if not run_demo(args.workdir):
        raise SystemExit(1)


def _eval(args) -> None:
    import json
    import pathlib
    import time

    from instructor_jax.evaluation.instructions import load_instructions

    # Everything that can be checked without the model and mteb is, first.
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    load_instructions(args.instructions)
    if args.compare:
        from instructor_jax.evaluation.run import load_reference

        reference = load_reference(args.compare)
    start = time.perf_counter()
    from instructor_jax import Instructor
    from instructor_jax.evaluation import MTEBEncoder, load_tasks
    from instructor_jax.evaluation import run

    tasks = load_tasks(args.tasks or None)
    model = Instructor.from_pretrained(args.model, pooling_rule=args.pooling_rule)
    path = pathlib.Path(args.model).absolute()
    # A training run's export is W/model: name it after the run.
    name = f"{path.parent.name}/{path.name}" if path.name in ("model", "sentence_transformers") else path.name

    def make_encoder(instructions, use_instructions=not args.no_instructions):
        return MTEBEncoder(model, instructions, default_instruction=args.default_instruction,
                           use_instructions=use_instructions, batch_size=args.batch_size, dtype=args.dtype, name=name)

    output = pathlib.Path(args.output)
    if args.paraphrases:
        paraphrases = run.load_paraphrases(args.paraphrases)
        report = run.paraphrase_robustness(make_encoder, tasks, paraphrases, args.batch_size)
        output.mkdir(parents=True, exist_ok=True)
        (output / "robustness.json").write_text(json.dumps(report, indent=1) + "\n")
        (output / "robustness.md").write_text(run.robustness_table(report))
        print(run.robustness_table(report), end="")
        print(f"wrote {output}/robustness.json and robustness.md in {time.perf_counter() - start:.1f}s")
        return
    summary = run.evaluate(make_encoder(args.instructions), tasks, output, args.batch_size,
                           model=f"{name}{' (no instructions)' if args.no_instructions else ''}")
    print(run.markdown_table(summary), end="")
    print(f"wrote mteb's results under {output}/results and {output}/summary.json, summary.md "
          f"({len(tasks)} tasks in {time.perf_counter() - start:.1f}s)")
    if args.compare:
        print(run.compare(summary, reference), end="")


def _plot(args) -> None:
    import pathlib

    from instructor_jax import plots

    if not (args.metrics or args.model):
        raise ValueError("give --metrics W/metrics.jsonl (training curves) and/or --model DIR (an embedding map)")
    output = pathlib.Path(args.output)
    written = []
    if args.metrics:
        written.append(plots.training_curves(args.metrics, output / "training_curves.png"))
    if args.model:
        from instructor_jax import Instructor
        from instructor_jax.evaluation.instructions import BUNDLED_TASKS

        texts, labels, instruction = plots.labelled_set(args.task or BUNDLED_TASKS / "TinySubjectClustering")
        if args.instruction is not None:
            instruction = args.instruction
        model = Instructor.from_pretrained(args.model)
        written.append(plots.embedding_map(model, texts, labels, instruction, output / "embedding_map.png",
                                           method=args.method))
    for path in written:
        print(f"wrote {path}")


def _add_pooling_rule_argument(parser) -> None:
    from instructor_jax.model.tokenization import POOLING_RULES

    parser.add_argument("--pooling_rule", choices=POOLING_RULES,
                        help="which tokens the mean pooling covers: 'instructor' (text only, InstructorEmbedding "
                             "1.0.1), 'sentence-transformers' (text only, prompt= semantics) or 'none' (the "
                             "instruction too, as GTR). Default: decided from the checkpoint's files, its hub id "
                             "or model card, else 'instructor'; a log line says which and why")


def _add_multiprocess_arguments(parser, what: str) -> None:
    """The flags that make a command one process of several (read by `_join_processes`)."""
    multi = parser.add_argument_group(
        "multi-process", f"One process per host (or per GPU), all running the same command; each {what}. Give "
        "all three flags (or the INSTRUCTOR_JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID environment "
        "variables; a flag and a variable that disagree are an error), or none: then JAX's own detection is used "
        "on a Cloud TPU VM, in a SLURM step of several tasks or an Open MPI job, and otherwise one process runs. "
        "See launch/README.md.")
    multi.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0, reachable from every process, and a free port")
    multi.add_argument("--num_processes", type=int, metavar="N", help="number of processes in the job")
    multi.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructor-jax", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert", help="convert a checkpoint between sentence-transformers/PyTorch, t5x and instructor-jax",
        description="Converts SRC into DST. The direction follows from SRC (a sentence-transformers directory "
                    "or a t5x checkpoint becomes instructor-jax, an instructor-jax one becomes "
                    "sentence-transformers) unless --to says otherwise. DST is written under a temporary name "
                    "and renamed at the end.")
    convert.add_argument("src", help="source directory (a t5x checkpoint: its checkpoint_<step> directory), or a "
                                     "hub id such as hkunlp/instructor-large")
    convert.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    convert.add_argument("--to", choices=("jax", "pytorch", "t5x"),
                         help="target format (default: inferred from SRC); t5x writes a legacy t5x checkpoint "
                              "directory (msgpack + zarr) that t5x_retrieval restores")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    _add_pooling_rule_argument(convert)
    t5x = convert.add_argument_group(
        "t5x sources", "A t5x checkpoint's tensors give the encoder's shape (width, heads, head size, "
        "feed-forward size and kind, layers, buckets); these say the rest. Pooling defaults to 'none' (t5x's "
        "mean over every non-padding token), then the Dense projection and L2 norm.")
    t5x.add_argument("--tokenizer", metavar="DIR_OR_MODEL",
                     help="the vocabulary, which a t5x checkpoint does not hold: a tokenizer directory or a "
                          "SentencePiece .model file. The published GTR / sentence-T5 t5x checkpoints use "
                          "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model")
    t5x.add_argument("--relative_attention_max_distance", type=int, metavar="N",
                     help="relative position distance beyond which buckets are shared (default 128, t5x's)")
    t5x.add_argument("--layer_norm_epsilon", type=float, metavar="EPS", help="RMS norm epsilon (default 1e-6)")
    t5x.add_argument("--feed_forward_proj", metavar="[gated-]ACT",
                     help="the MLP's activation (default: relu, or gated-gelu when the checkpoint has "
                          "mlp/wi_0 and wi_1)")
    t5x.add_argument("--max_seq_length", type=int, metavar="N", help="tokens per input (default 512)")
    convert.set_defaults(run=_convert)

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
    _add_pooling_rule_argument(encode)
    _add_multiprocess_arguments(encode, "encodes a contiguous share of INPUT into its own shard")
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
    _add_multiprocess_arguments(train, "trains its share of each global batch")
    train.set_defaults(run=_train)

    demo = commands.add_parser("demo", help="build a tiny model, convert it both ways, show PyTorch parity")
    demo.add_argument("--workdir", help="where to write the demo's models (default: a temporary directory)")
    demo.set_defaults(run=_demo)

    evaluate = commands.add_parser(
        "eval", help="evaluate with mteb (INSTRUCTOR's per-task instructions), offline on local tasks",
        description="Runs mteb 2.x (the mteb extra; Python >= 3.11) on TASKS with the model, each task with its "
                    "INSTRUCTOR instruction, and writes mteb's results layout (OUTPUT/results/...) plus "
                    "OUTPUT/summary.json and summary.md (per-category averages, as the MTEB table). With no "
                    "--tasks it runs the bundled offline tasks, one per mteb task type. MTEB's own task names "
                    "need the Hugging Face hub for their data.")
    evaluate.add_argument("--model", required=True, help="model directory or hub id")
    evaluate.add_argument("--tasks", nargs="+", metavar="NAME|DIR",
                          help="MTEB task names (e.g. STS12 SciFact) and/or local task directories (a directory "
                               "with task.json, or one holding several); default: the bundled tasks")
    evaluate.add_argument("--output", required=True, help="directory for the results and the summary")
    evaluate.add_argument("--instructions", metavar="JSON|MODEL",
                          help="per-task instructions: a JSON file {task: instruction or {query, corpus}} (or "
                               "FILE::TABLE), or one of the reference's tables: hkunlp/instructor-base, "
                               "hkunlp/instructor-large, hkunlp/instructor-xl. Local tasks fall back to their "
                               "task.json's own")
    evaluate.add_argument("--default_instruction", metavar="TEXT",
                          help="instruction for tasks that have none (otherwise such a task is an error)")
    evaluate.add_argument("--no_instructions", action="store_true",
                          help="embed everything with no instruction (the ablation)")
    evaluate.add_argument("--batch_size", type=int, default=32, help="rows per device batch (default 32)")
    evaluate.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the model's)")
    evaluate.add_argument("--compare", metavar="RESULTS|MODEL",
                          help="print the difference from another run (its OUTPUT or summary.json) or from the "
                               "leaderboard figures of hkunlp/instructor-{base,large,xl}")
    evaluate.add_argument("--paraphrases", metavar="FILE",
                          help="instruction robustness: a JSON file {task: [instruction, ...]}; each task is "
                               "run once per instruction and the best, worst, spread and standard deviation "
                               "of its main score reported (bundled: instructor_jax/assets/eval_tasks/"
                               "paraphrases.json)")
    _add_pooling_rule_argument(evaluate)
    evaluate.set_defaults(run=_eval)

    plot = commands.add_parser(
        "plot", help="PNG pictures: training curves, and a 2-D map of embeddings with/without instruction",
        description="Writes OUTPUT/training_curves.png from a run's metrics.jsonl (loss, learning rate, held-out "
                    "accuracy, evaluation scores against the step) and/or OUTPUT/embedding_map.png: a labelled "
                    "set embedded with and without its instruction, side by side (needs the plot extra).")
    plot.add_argument("--metrics", help="a training run's metrics.jsonl")
    plot.add_argument("--model", help="model directory for the embedding map")
    plot.add_argument("--task", help="a local Clustering or Classification task directory to map (default: the "
                                     "bundled TinySubjectClustering)")
    plot.add_argument("--instruction", help="the instruction to map with (default: the task's own)")
    plot.add_argument("--method", choices=("pca", "tsne"), default="pca", help="2-D projection (default pca)")
    plot.add_argument("--output", required=True, help="directory for the PNG files")
    plot.set_defaults(run=_plot)

    data = commands.add_parser("data", help="prepare training data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    build_tfds = data_commands.add_parser(
        "build-tfds", help="build MEDI as a TFDS dataset (ArrayRecord) from a local MEDI file",
        description="Builds the `medi` TensorFlow Datasets dataset (ArrayRecord files, record order kept) from "
                    "INPUT into DATA_DIR/medi/1.0.0, without TensorFlow (needs the tfds extra). Train from it "
                    "with --gin_bindings \"TrainConfig.train_file = 'tfds:medi'\" --gin_bindings "
                    "\"TrainConfig.tfds_data_dir = 'DATA_DIR'\".")
    build_tfds.add_argument("--input", required=True, help="the MEDI file: a JSON list (.json) or JSON Lines")
    build_tfds.add_argument("--data_dir", required=True, help="the TFDS data directory to build into")
    build_tfds.add_argument("--skip_bad_records", action="store_true", help="skip malformed records (counted)")
    build_tfds.set_defaults(run=_build_tfds)
    return parser


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
        args.run(args)
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


if __name__ == "__main__":
    main()
