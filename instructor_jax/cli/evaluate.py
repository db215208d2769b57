"""`instructor-jax eval`: mteb evaluation with INSTRUCTOR's per-task instructions."""

from __future__ import annotations

from instructor_jax.checkpoints.pooling_evidence import add_pooling_rule_argument


def add_parser(commands) -> None:
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
    add_pooling_rule_argument(evaluate)
    evaluate.set_defaults(run=run)


def run(args) -> None:
    import json
    import pathlib
    import time

    from instructor_jax.evaluation.instructions import load_instructions
    from instructor_jax.evaluation.tasks import check_local_tasks

    # Everything that can be checked without the model and mteb is, first.
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    table = load_instructions(args.instructions)
    check_local_tasks(args.tasks)
    if args.compare:
        from instructor_jax.evaluation.run import load_reference

        reference = load_reference(args.compare)
    if args.paraphrases:
        from instructor_jax.evaluation.run import load_paraphrases

        paraphrases = load_paraphrases(args.paraphrases)
    start = time.perf_counter()
    from instructor_jax import Instructor
    from instructor_jax.evaluation import MTEBEncoder, load_tasks
    from instructor_jax.evaluation import run

    tasks = load_tasks(args.tasks or None)
    _warn_unused_instructions(args.instructions, table, [t.metadata.name for t in tasks])
    model = Instructor.from_pretrained(args.model, pooling_rule=args.pooling_rule)
    path = pathlib.Path(args.model).absolute()
    # A training run's export is W/model: name it after the run.
    name = f"{path.parent.name}/{path.name}" if path.name in ("model", "sentence_transformers") else path.name

    def make_encoder(instructions, use_instructions=not args.no_instructions):
        return MTEBEncoder(model, instructions, default_instruction=args.default_instruction,
                           use_instructions=use_instructions, batch_size=args.batch_size, dtype=args.dtype, name=name)

    output = pathlib.Path(args.output)
    if args.paraphrases:
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
        # Both runs may be of "run/model": the columns say which results each is.
        names = (f"{summary['model']} ({output})", f"{reference.get('model', 'reference')} ({args.compare})")
        print(run.compare(summary, reference, names), end="")



def _warn_unused_instructions(spec, table: dict, task_names) -> None:
    """An instruction file's task that is not run is likely a misspelt name (its task would then run with
    another instruction, or fail for want of one): said, not ignored. The reference's tables cover all of
    MTEB, so only the user's files are checked."""
    import json
    import logging
    import pathlib

    from instructor_jax.evaluation.instructions import REFERENCE_TABLE

    if spec is None or str(spec) in json.loads(REFERENCE_TABLE.read_text()):
        return
    if pathlib.Path(str(spec).partition("::")[0]).resolve() == REFERENCE_TABLE.resolve():
        return
    unused = sorted(set(table) - set(task_names))
    if unused:
        logging.getLogger(__name__).warning(
            "--instructions %s: no task run is named %s; those entries are unused (the tasks run: %s). Check the "
            "spelling of the task names", spec, ", ".join(unused), ", ".join(task_names))
