"""Pictures (the `plot` extra: matplotlib; t-SNE also needs scikit-learn): training curves and 2-D maps.

    instructor-jax plot --metrics runs/tiny/metrics.jsonl --model runs/tiny/model --output pictures/

- `training_curves`: loss, learning rate, held-out accuracy and evaluation scores against the step, from a
  run's metrics.jsonl;
- `embedding_map`: a labelled set embedded with and without its instruction, side by side (PCA, or t-SNE),
  as in the paper's analysis: with the instruction, texts of one label gather.

Figures are drawn with matplotlib's object API on an Agg canvas, never pyplot, so no global backend or
window state is touched.
"""

from __future__ import annotations

import pathlib
from typing import Optional, Sequence

import numpy as np

from instructor_jax.runtime import jsonl

CURVES_SIZE = (10, 7.5)  # inches at DPI: 1000 x 750 pixels
MAP_SIZE = (12, 5.5)  # 1200 x 550 pixels
DPI = 100


def _figure(size):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"plots need matplotlib: pip install 'instructor-jax[plot]' ({e})") from e
    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def read_metrics(path) -> list[dict]:
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (a training run writes WORKDIR/metrics.jsonl)")
    records = []
    hint = "; --metrics takes the metrics.jsonl a training run writes, one JSON object a line"
    for number, record in jsonl.numbered_lines(path, hint):
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise ValueError(f"{path}, line {number}: not a metrics record (a JSON object with an integer "
                             "\"step\"); --metrics takes the metrics.jsonl a training run writes")
        records.append(record)
    return records


def _series(records, key):
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def curve_panels(records) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of each panel with something to draw, in the order loss, learning rate, held-out
    accuracy, evaluation scores."""
    panels = [("loss", ["loss"]), ("learning rate", ["learning_rate"]),
              ("held-out in-batch accuracy", ["held_out_accuracy"]),
              ("evaluation main scores", sorted({k for r in records for k in r if k.startswith("eval/")}))]
    return [(title, keys) for title, keys in panels if any(_series(records, key)[0] for key in keys)]


def legend_entries(labels, label_names: Optional[Sequence[str]] = None) -> list[tuple]:
    """(label, its name) of each distinct label, in label order; label i is named label_names[i] where given."""
    def name(label):
        return label_names[label] if label_names is not None and isinstance(label, int) else str(label)

    return [(label, name(label)) for label in sorted(set(np.asarray(labels).tolist()))]


def training_curves(metrics_path, output) -> pathlib.Path:
    """A PNG of loss, learning rate, held-out accuracy and evaluation main scores (eval/TASK) by step: one panel
    for each of those the run logged (2 x 2 for four, one row for fewer), none left empty."""
    records = read_metrics(metrics_path)
    panels = curve_panels(records)
    if not panels:
        raise ValueError(f"{metrics_path} logs no loss, learning rate or accuracy to draw")
    figure = _figure(CURVES_SIZE)
    axes = figure.subplots(2, 2).ravel() if len(panels) == 4 else np.atleast_1d(figure.subplots(1, len(panels)))
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            steps, values = _series(records, key)
            if steps:
                ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3,
                        label=key.removeprefix("eval/"))
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return _save(figure, output)


def _save(figure, output) -> pathlib.Path:
    output = pathlib.Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, format="png", dpi=DPI)
    return output


def project_2d(embeddings: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """[n, 2]: the first two principal components (numpy), or t-SNE (scikit-learn)."""
    if method == "pca":
        centered = embeddings - embeddings.mean(0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        return centered @ vt[:2].T
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = max(2.0, min(30.0, (len(embeddings) - 1) / 3))
        return TSNE(n_components=2, perplexity=perplexity, random_state=seed, init="pca").fit_transform(embeddings)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}")


def labelled_set(task_dir) -> tuple[list[str], list, str, Optional[list[str]]]:
    """(texts, labels, instruction, label names or None) of a local Clustering or Classification task (its
    test split); task.json's optional "label_names" names label i."""
    from instructor_jax.evaluation.tasks import read_jsonl, read_task_json

    task_dir = pathlib.Path(task_dir)
    spec = read_task_json(task_dir)
    if spec["type"] not in ("Clustering", "Classification"):
        raise ValueError(f"{task_dir} is a {spec['type']} task; a map needs labelled texts (Clustering or Classification)")
    rows = read_jsonl(task_dir / "test.jsonl", ["text", "label"])
    instruction = spec.get("instruction") or ""
    return [r["text"] for r in rows], [r["label"] for r in rows], instruction, spec.get("label_names")


def embedding_map(model, texts: Sequence[str], labels: Sequence, instruction: str, output,
                  method: str = "pca", title: Optional[str] = None,
                  label_names: Optional[Sequence[str]] = None) -> pathlib.Path:
    """Side by side: `texts` embedded with no instruction and with `instruction`, coloured by label; the
    legend lists the labels in order (label i named `label_names[i]` where given)."""
    labels = np.asarray(labels)
    figure = _figure(MAP_SIZE)
    axes = figure.subplots(1, 2)
    classes = legend_entries(labels, label_names)
    for ax, (name, used) in zip(axes, [("without instruction", ""), ("with instruction", instruction)]):
        points = project_2d(model.encode(list(texts), instruction=used), method)
        for k, (label, name) in enumerate(classes):
            chosen = labels == label
            ax.scatter(points[chosen, 0], points[chosen, 1], s=14, color=f"C{k % 10}", label=name)
        ax.set_title(f"{name}" + (f"\n{used.strip()!r}" if used else ""), fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(fontsize=7, loc="best", title="label")
    figure.suptitle(title or f"{len(texts)} labelled texts, {method.upper()}")
    figure.tight_layout()
    return _save(figure, output)
