"""`instructor-jax plot`: training curves and embedding maps as PNG files."""

from __future__ import annotations

def add_parser(commands) -> None:
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
    plot.set_defaults(run=run)


def run(args) -> None:
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

        texts, labels, instruction, names = plots.labelled_set(args.task or BUNDLED_TASKS / "TinySubjectClustering")
        if args.instruction is not None:
            instruction = args.instruction
        model = Instructor.from_pretrained(args.model)
        written.append(plots.embedding_map(model, texts, labels, instruction, output / "embedding_map.png",
                                           method=args.method, label_names=names))
    for path in written:
        print(f"wrote {path}")

