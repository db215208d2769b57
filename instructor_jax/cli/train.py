"""`instructor-jax train`: a training run from gin config files."""

from __future__ import annotations

from instructor_jax.runtime.process_flags import add_multiprocess_arguments, join_processes


def add_parser(commands) -> None:
    train = commands.add_parser(
        "train", help="train an instruction embedder from gin config files",
        description="Trains (or resumes, if WORKDIR holds a checkpoint) as the gin files say. Writes "
                    "WORKDIR/metrics.jsonl, TensorBoard events, orbax checkpoints, and at the end WORKDIR/model "
                    "and WORKDIR/sentence_transformers.")
    train.add_argument("--gin_file", action="append", default=[],
                       help="gin config file, or the name of a bundled one: tiny, instructor_base, instructor_large, "
                            "instructor_xl (repeatable)")
    train.add_argument("--gin_bindings", action="append", default=[],
                       help="a gin binding such as 'TrainConfig.total_steps = 100' (repeatable)")
    train.add_argument("--workdir", required=True, help="where checkpoints, logs and exports go")
    add_multiprocess_arguments(train, "trains its share of each global batch")
    train.set_defaults(run=run)


def run(args) -> None:
    # Before gin or anything else may touch a JAX backend: one process of several joins the others.
    join_processes(args)

    import gin

    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.gin_files import resolve_gin_file
    from instructor_jax.train.loop import train

    # A fresh configuration for this run, and none left behind: the process may run others (tests, notebooks),
    # whose TrainConfig() would otherwise take this run's bindings.
    gin.clear_config()
    try:
        try:
            gin.parse_config_files_and_bindings([resolve_gin_file(f) for f in args.gin_file], args.gin_bindings)
        except SyntaxError as e:  # gin's parser reports a malformed file or binding as Python syntax
            where = f"{e.filename}, line {e.lineno}" if e.filename else f"line {e.lineno}"
            raise ValueError(f"cannot parse the gin configuration: {e.msg} ({where})") from None
        result = train(args.workdir, TrainConfig())
    finally:
        gin.clear_config()
    if "preempted_at" in result:  # saved; the run is not finished (the log said how to resume)
        from instructor_jax.runtime.interrupts import PREEMPTED_EXIT_CODE

        raise SystemExit(PREEMPTED_EXIT_CODE)

