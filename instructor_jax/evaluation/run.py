"""Running tasks: mteb's results layout, a summary shaped like the MTEB table, comparisons, paraphrases."""

from __future__ import annotations

import json
import logging
import pathlib
import statistics

from instructor_jax.evaluation.instructions import CATEGORIES, LEADERBOARD, load_instructions
from instructor_jax.evaluation.tasks import LOCAL_PREFIX

log = logging.getLogger(__name__)

SHORT = {"Classification": "class", "Clustering": "clust", "PairClassification": "pair", "Reranking": "rerank",
         "Retrieval": "retr", "STS": "STS", "Summarization": "summ"}


class HubUnreachable(OSError):
    """An MTEB task's data could not be fetched from the hub."""


def _is_local(task) -> bool:
    return str(task.metadata.dataset.get("path", "")).startswith(LOCAL_PREFIX)


def _load_hub_data(tasks) -> None:
    """Fetches the data of MTEB's own tasks first, so that an offline machine is told so in one line."""
    for task in tasks:
        if _is_local(task) or getattr(task, "data_loaded", False):
            continue
        try:
            task.load_data()
        except Exception as e:  # noqa: BLE001 - datasets and huggingface_hub raise many kinds when offline
            raise HubUnreachable(
                f"the MTEB task {task.metadata.name} needs its data from the Hugging Face hub, which could not be "
                f"reached ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}). Run it where the "
                "hub is reachable (and HF_HUB_OFFLINE is unset), or evaluate on local task directories "
                "(--tasks DIR; see instructor_jax/evaluation/tasks.py)") from e


def run_tasks(encoder, tasks, output=None, batch_size: int = 32) -> dict:
    """{task name: main score (0-1)} from `mteb.evaluate`; with `output`, mteb writes its results layout
    there (OUTPUT/results/MODEL/REVISION/TASK.json)."""
    import mteb

    encoder.check_tasks(tasks)
    _load_hub_data(tasks)
    cache = mteb.ResultCache(cache_path=str(output)) if output is not None else None
    result = mteb.evaluate(encoder, tasks, cache=cache, overwrite_strategy="always", show_progress_bar=False,
                           encode_kwargs={"batch_size": batch_size})
    return {r.task_name: float(r.get_score()) for r in result.task_results}


def summarize(scores: dict, tasks, encoder=None, model: str = "") -> dict:
    """Per-task main scores and per-category averages (x 100, as the MTEB table shows them)."""
    types = {t.metadata.name: t.metadata.type for t in tasks}
    per_task = {name: {"type": types.get(name, "?"), "main_score": next(
        (t.metadata.main_score for t in tasks if t.metadata.name == name), None), "score": 100 * score}
                for name, score in scores.items()}
    categories = {}
    for category in CATEGORIES:
        values = [v["score"] for v in per_task.values() if v["type"] == category]
        if values:
            categories[category] = statistics.fmean(values)
    summary = {"model": model, "average": statistics.fmean(v["score"] for v in per_task.values()) if per_task else None,
               "categories": categories, "tasks": per_task}
    if encoder is not None:
        summary["instructions"] = {f"{task}{'-' + kind if kind else ''}": text
                                   for (task, kind), text in sorted(encoder.used.items(), key=str)}
        summary["use_instructions"] = encoder.use_instructions
    return summary


def markdown_table(summary: dict) -> str:
    """The MTEB-shaped table (average and the categories present), then one row per task."""
    cats = [c for c in CATEGORIES if c in summary["categories"]]
    lines = ["| model | avg | " + " | ".join(SHORT[c] for c in cats) + " |",
             "|---|---|" + "---|" * len(cats),
             f"| {summary['model']} | {summary['average']:.2f} | "
             + " | ".join(f"{summary['categories'][c]:.2f}" for c in cats) + " |", "",
             "| task | type | main score | score |", "|---|---|---|---|"]
    lines += [f"| {name} | {v['type']} | {v['main_score']} | {v['score']:.2f} |" for name, v in summary["tasks"].items()]
    return "\n".join(lines) + "\n"


def write_summary(summary: dict, output) -> None:
    output = pathlib.Path(output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (output / "summary.md").write_text(markdown_table(summary))


def evaluate(encoder, tasks, output=None, batch_size: int = 32, model: str = "") -> dict:
    """Runs `tasks` with `encoder`, writes mteb's results and summary.json / summary.md to `output`."""
    summary = summarize(run_tasks(encoder, tasks, output, batch_size), tasks, encoder, model)
    if output is not None:
        write_summary(summary, output)
    return summary


def load_reference(spec) -> dict:
    """A summary to compare with: a run's directory or summary.json, or a leaderboard model name."""
    if str(spec) in LEADERBOARD:
        figures = LEADERBOARD[str(spec)]
        return {"model": f"{spec} (MTEB leaderboard)", "average": figures["average"],
                "categories": {c: figures[c] for c in CATEGORIES}, "tasks": {}}
    path = pathlib.Path(spec)
    path = path / "summary.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"--compare {spec}: neither a results directory with summary.json, a summary.json, "
                                f"nor a leaderboard model ({', '.join(LEADERBOARD)})")
    return json.loads(path.read_text())


def compare(summary: dict, reference: dict, names: tuple = ("this run", "reference")) -> str:
    """A markdown table of this run minus the reference, per task (when both have it), per category and
    on average. Categories the reference lacks are left out. Where the two ran different tasks, the category
    and average rows are recomputed over the tasks both ran, and a note says so; a reference without
    per-task scores (the leaderboard's) averages over its own tasks, which the note says too."""
    rows = [f"| | {names[0]} | {names[1]} | difference |", "|---|---|---|---|"]
    theirs = reference.get("tasks") or {}
    shared = [name for name in summary["tasks"] if name in theirs]
    for name in shared:
        mine, other = summary["tasks"][name]["score"], theirs[name]["score"]
        rows.append(f"| {name} | {mine:.2f} | {other:.2f} | {mine - other:+.2f} |")
    note = ""
    ours, references = summary["categories"], reference.get("categories", {})
    average, reference_average = summary.get("average"), reference.get("average")
    if not theirs:
        note = (f"note: the reference gives averages over its own tasks, this run's are over its {len(summary['tasks'])} "
                "task(s): the category and average rows compare different task sets\n")
    elif set(theirs) != set(summary["tasks"]):
        only_here = sorted(set(summary["tasks"]) - set(theirs))
        only_there = sorted(set(theirs) - set(summary["tasks"]))
        note = (f"note: the runs share {len(shared)} task(s) (only in this run: {only_here or 'none'}; only in the "
                f"reference: {only_there or 'none'}); the category and average rows are over the shared tasks\n")
        ours, references = _category_means(summary["tasks"], shared), _category_means(theirs, shared)
        average = statistics.fmean(summary["tasks"][n]["score"] for n in shared) if shared else None
        reference_average = statistics.fmean(theirs[n]["score"] for n in shared) if shared else None
    for category, value in ours.items():
        if category in references:
            other = references[category]
            rows.append(f"| {SHORT[category]} (category) | {value:.2f} | {other:.2f} | {value - other:+.2f} |")
    if average is not None and reference_average is not None:
        rows.append(f"| average | {average:.2f} | {reference_average:.2f} | {average - reference_average:+.2f} |")
    return f"compared with {reference.get('model') or 'the reference'}:\n" + "\n".join(rows) + "\n" + note


def _category_means(tasks: dict, names) -> dict:
    """{category: mean score} over the tasks `names` of a summary's per-task scores."""
    means = {}
    for category in CATEGORIES:
        values = [tasks[n]["score"] for n in names if tasks[n].get("type") == category]
        if values:
            means[category] = statistics.fmean(values)
    return means


def load_paraphrases(path) -> dict:
    """{task: [entry, ...]}: several instructions per task (strings or {"query", "corpus"})."""
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--paraphrases {path}: not JSON ({e.msg}, line {e.lineno} column {e.colno}); it must be "
                         "an object {task: [instruction, ...]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--paraphrases {path}: must be a JSON object {{task: [instruction, ...]}}, got a "
                         f"{type(data).__name__}")
    data = {k: v for k, v in data.items() if not k.startswith("_")}
    for task, entries in data.items():
        if not isinstance(entries, list) or len(entries) < 2:
            raise ValueError(f"{path}: {task} needs a list of at least two instructions")
        load_instructions({task: e for e in entries})  # checks each entry's shape
    return data


def paraphrase_robustness(make_encoder, tasks, paraphrases: dict, batch_size: int = 32) -> dict:
    """The paper's robustness analysis: each task evaluated once per paraphrase of its instruction.

    `make_encoder(instructions)` returns an MTEBEncoder using that table. Returns {task: {"scores",
    "best", "worst", "spread", "std", "instructions"}} (x 100). Each evaluation gets fresh task objects
    (mteb seeds at task creation), so the paraphrases of a task differ by their instruction alone."""
    from instructor_jax.evaluation.tasks import load_local_task

    missing = [t.metadata.name for t in tasks if t.metadata.name not in paraphrases]
    if missing:
        raise ValueError(f"the paraphrase file has no instructions for {missing}")
    report = {}
    for task in tasks:
        name, scores = task.metadata.name, []
        for entry in paraphrases[name]:
            fresh = load_local_task(task.local_directory) if _is_local(task) else type(task)()
            scores.append(100 * run_tasks(make_encoder({name: entry}), [fresh], None, batch_size)[name])
        report[name] = {"scores": scores, "best": max(scores), "worst": min(scores),
                        "spread": max(scores) - min(scores), "std": statistics.pstdev(scores),
                        "instructions": paraphrases[name]}
    return report


def robustness_table(report: dict) -> str:
    lines = ["| task | paraphrases | best | worst | spread | std |", "|---|---|---|---|---|---|"]
    lines += [f"| {name} | {len(r['scores'])} | {r['best']:.2f} | {r['worst']:.2f} | {r['spread']:.2f} | {r['std']:.2f} |"
              for name, r in report.items()]
    return "\n".join(lines) + "\n"
