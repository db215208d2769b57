"""What `data mine` writes: MEDI JSONL, the report, and the held-out pairs as a local retrieval task.

MEDI lines are `{"query": [instruction, text], "pos": [instruction, text], "neg": [instruction, text],
"task_name": task}`, one per negative: `instructor_jax.train.data.read_medi` reads them as they are. Every file
is written under a temporary name and renamed into place, so an interrupted run leaves nothing half-written.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

import numpy as np

from instructor_jax.encode.embedding_store import write_text_atomically
from instructor_jax.runtime.fileio import atomic_directory


def medi_line(query: Sequence[str], pos: Sequence[str], neg: Sequence[str], task: str) -> str:
    return json.dumps({"query": list(query), "pos": list(pos), "neg": list(neg), "task_name": task},
                      ensure_ascii=False)


def report_path(output) -> str:
    """Where the report goes: MEDI.jsonl -> MEDI.report.json."""
    name = str(output)
    return (name[:-len(".jsonl")] if name.endswith(".jsonl") else name) + ".report.json"


def distribution(values) -> dict:
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return {"count": 0}
    quantiles = np.quantile(values, [0.25, 0.5, 0.75])
    return {"count": int(values.size), "mean": round(float(values.mean()), 4), "std": round(float(values.std()), 4),
            "min": round(float(values.min()), 4), "25%": round(float(quantiles[0]), 4),
            "50%": round(float(quantiles[1]), 4), "75%": round(float(quantiles[2]), 4),
            "max": round(float(values.max()), 4)}


def format_report(report: dict) -> str:
    lines = [f"rows in: {report['rows_in']} ({report['queries']} queries), MEDI lines out: {report['rows_out']}"]
    if "embedded" in report:
        e = report["embedded"]
        lines.append(f"texts embedded: {e['texts']} ({e['encoded']} encoded by this run, {e['reused']} taken from "
                     f"an earlier one) in {e['work_dir']}")
    for name, count in report.get("removed", {}).items():
        lines.append(f"candidates removed by {name}: {count}")
    if "short" in report:
        lines.append(f"(query, positive) rows with fewer than {report['num_negatives']} negatives: {report['short']}"
                     f" (of which {report['without_negative']} with none, left out)")
    if "skipped" in report:
        lines.append(f"examples without a positive or a negative (left out): {report['skipped']}")
    for name in ("positive_scores", "negative_scores"):
        d = report.get(name, {})
        if d.get("count"):
            lines.append(f"{name.replace('_', ' ')}: n={d['count']} mean {d['mean']:.4f} std {d['std']:.4f} "
                         f"min {d['min']:.4f} median {d['50%']:.4f} max {d['max']:.4f}")
    for task, found in report.get("holdout", {}).get("recall", {}).items():
        lines.append(f"held-out {task}: {found['pairs']} pairs, recall@1 {found['recall@1']:.4f}, "
                     f"recall@10 {found['recall@10']:.4f} (mining model, before training)")
    return "\n".join(lines) + "\n"


def write_outputs(output, lines: Sequence[str], report: dict) -> None:
    """The MEDI file and its report, each renamed into place complete (the report last)."""
    write_text_atomically(output, "".join(line + "\n" for line in lines))
    write_text_atomically(report_path(output), json.dumps(report, indent=1) + "\n")


def write_histogram(report: dict, path) -> str:
    """Positive and negative score histograms as a PNG (the `plot` extra: `run` checks it is installed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    for name in ("positive", "negative"):
        values = report.get(f"_{name}_values", [])
        if len(values):
            axis.hist(values, bins=40, alpha=0.6, label=name)
    axis.set_xlabel("score (cosine)")
    axis.legend()
    figure.tight_layout()
    tmp = pathlib.Path(str(path) + ".tmp.png")
    figure.savefig(tmp)
    plt.close(figure)
    tmp.replace(path)
    return str(path)


def write_eval_task(directory, name: str, instructions: tuple[str, str], queries: Sequence[str],
                    corpus: Sequence[str], relevant: Sequence[Sequence[int]], overwrite: bool = False) -> None:
    """A local Retrieval task (instructor_jax.evaluation.tasks' layout): `queries[i]` is relevant to the
    corpus rows `relevant[i]`."""
    spec = {"name": name, "type": "Retrieval",
            "description": "Held-out pairs of `instructor-jax data mine --holdout`: find each query's positive.",
            "instruction": {"query": instructions[0], "corpus": instructions[1]}}

    def jsonl(rows) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)

    with atomic_directory(directory, overwrite, replaceable=_is_eval_task) as staging:
        (staging / "task.json").write_text(json.dumps(spec, indent=1) + "\n")
        (staging / "queries.jsonl").write_text(jsonl({"id": f"q{i}", "text": t} for i, t in enumerate(queries)))
        (staging / "corpus.jsonl").write_text(jsonl({"id": f"d{j}", "title": "", "text": t}
                                                    for j, t in enumerate(corpus)))
        (staging / "qrels.jsonl").write_text(jsonl({"query_id": f"q{i}", "doc_id": f"d{j}", "score": 1}
                                                   for i, rows in enumerate(relevant) for j in rows))


def _is_eval_task(path: pathlib.Path) -> Optional[str]:
    names = {p.name for p in path.iterdir()}
    if names <= {"task.json", "queries.jsonl", "corpus.jsonl", "qrels.jsonl"}:
        return None
    return "it holds files other than a retrieval task's"
