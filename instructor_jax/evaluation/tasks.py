"""Local mteb tasks from JSONL files, so that evaluation runs with no hub.

A task is a directory holding `task.json`:

    {"name": "MyRetrieval", "type": "Retrieval", "description": "...",
     "instruction": "..." | {"query": "...", "corpus": "..."},     optional: used when --instructions has none
     "main_score": "ndcg_at_10",                                    optional: mteb's usual one for the type
     "min_score": 0, "max_score": 5}                                STS and Summarization: the gold range

and, per type (one JSON object per line):

    STS                 test.jsonl      {"sentence1", "sentence2", "score"}
    PairClassification  test.jsonl      {"sentence1", "sentence2", "label": 0 | 1}
    Classification      train.jsonl, test.jsonl   {"text", "label"}  (mteb trains on 8 per label, 10 draws)
    Clustering          test.jsonl      {"text", "label"}  (optional "set": rows of one set are clustered
                                        together, and the sets' scores averaged, as MTEB's clustering tasks do)
    Retrieval           queries.jsonl {"id", "text"}; corpus.jsonl {"id", "text", "title"?};
                        qrels.jsonl {"query_id", "doc_id", "score"}
    Reranking           as Retrieval, plus top_ranked.jsonl {"query_id", "doc_ids": [...]} (the candidates;
                        without it every document is a candidate)
    Summarization       test.jsonl      {"text", "human_summaries": [...], "machine_summaries": [...],
                                         "relevance": [...]}

Each becomes a subclass of mteb's own abstract task for its type (AbsTaskSTS, AbsTaskRetrieval, ...) whose
`load_data` reads these files: mteb computes the scores, exactly as for its hub tasks.
"""

from __future__ import annotations

import json
import pathlib
from typing import Iterable

from instructor_jax.runtime import jsonl

MAIN_SCORES = {"STS": "cosine_spearman", "Summarization": "cosine_spearman", "Retrieval": "ndcg_at_10",
               "Reranking": "map_at_1000", "Classification": "accuracy", "Clustering": "v_measure",
               "PairClassification": "max_ap"}
FILES = {"STS": ["test.jsonl"], "PairClassification": ["test.jsonl"], "Summarization": ["test.jsonl"],
         "Classification": ["train.jsonl", "test.jsonl"], "Clustering": ["test.jsonl"],
         "Retrieval": ["queries.jsonl", "corpus.jsonl", "qrels.jsonl"],
         "Reranking": ["queries.jsonl", "corpus.jsonl", "qrels.jsonl"]}
LOCAL_PREFIX = "local:"  # TaskMetadata.dataset["path"] of a local task: how the encoder knows one


# Fields whose values mteb needs as text, or as numbers: checked per row, so that a bad row is named by its file
# and line rather than failing inside mteb.
TEXT_FIELDS = ("sentence1", "sentence2", "text")
NUMBER_FIELDS = ("score",)


def read_jsonl(path: pathlib.Path, required: Iterable[str]) -> list[dict]:
    rows = []
    for number, row in jsonl.numbered_lines(path):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: needs a JSON object with the fields {list(required)}, "
                             f"got a {type(row).__name__}")
        missing = [k for k in required if k not in row]
        if missing:
            raise ValueError(f"{path}, line {number}: needs the fields {list(required)} (missing {missing})")
        for key in required:
            value = row[key]
            if key in TEXT_FIELDS and not isinstance(value, str):
                raise ValueError(f"{path}, line {number}: {key!r} must be a string, got {value!r}")
            if key in NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"{path}, line {number}: {key!r} must be a number, got {value!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def read_task_json(directory) -> dict:
    """task.json of a local task directory, checked (no mteb import: the trainer checks its eval_tasks early)."""
    directory = pathlib.Path(directory)
    path = directory / "task.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a local task directory (no task.json); see "
                                "instructor_jax/evaluation/tasks.py for the layout")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg}, line {e.lineno} column {e.colno})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: needs a JSON object with 'name' and 'type', got a {type(spec).__name__}")
    for key in ("name", "type"):
        if not isinstance(spec.get(key), str):
            raise ValueError(f"{path}: needs a string {key!r}")
    check_task_name(spec["name"], path)
    if spec["type"] not in FILES:
        raise ValueError(f"{path}: type {spec['type']!r} is not one of {sorted(FILES)}")
    missing = [f for f in FILES[spec["type"]] if not (directory / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{directory}: a {spec['type']} task needs {missing}")
    return spec


def check_task_name(name: str, where) -> None:
    """A task's name becomes a file name in mteb's results layout (OUTPUT/results/MODEL/REVISION/NAME.json):
    one that holds a path (a separator, "..", a leading "." or "~") or control characters would write
    outside OUTPUT, or to a hidden file."""
    unsafe = (not name.strip() or "/" in name or "\\" in name or name.startswith((".", "~"))
              or any(ord(c) < 32 or ord(c) == 127 for c in name))
    if unsafe:
        raise ValueError(f"{where}: the task name {name!r} is not a plain file name (it names the task's results "
                         "file); use letters, digits, '-', '_' or '.', and no '/', '\\' or leading '.'")


def is_task_directory(path) -> bool:
    return (pathlib.Path(path) / "task.json").is_file()


def task_directories(path) -> list[pathlib.Path]:
    """A task directory, or the task directories inside a directory (sorted)."""
    path = pathlib.Path(path)
    if is_task_directory(path):
        return [path]
    found = sorted(p for p in path.iterdir() if is_task_directory(p)) if path.is_dir() else []
    if not found:
        raise FileNotFoundError(f"{path} holds no local task (a directory with task.json, or directories of them)")
    return found


def _load(directory: pathlib.Path, kind: str, spec: dict):
    from datasets import Dataset, DatasetDict

    if kind in ("STS", "PairClassification"):
        target = "score" if kind == "STS" else "label"
        rows = read_jsonl(directory / "test.jsonl", ["sentence1", "sentence2", target])
        column = "score" if kind == "STS" else "labels"  # mteb's column names
        return DatasetDict({"test": Dataset.from_dict({
            "sentence1": [r["sentence1"] for r in rows], "sentence2": [r["sentence2"] for r in rows],
            column: [r[target] for r in rows]})})
    if kind == "Classification":
        return DatasetDict({split: Dataset.from_dict({"text": [r["text"] for r in rows], "label": [r["label"] for r in rows]})
                            for split in ("train", "test")
                            for rows in [read_jsonl(directory / f"{split}.jsonl", ["text", "label"])]})
    if kind == "Clustering":
        rows = read_jsonl(directory / "test.jsonl", ["text", "label"])
        sets = {}
        for r in rows:
            sets.setdefault(r.get("set", 0), []).append(r)
        return DatasetDict({"test": Dataset.from_dict({"sentences": [[r["text"] for r in s] for s in sets.values()],
                                                       "labels": [[r["label"] for r in s] for s in sets.values()]})})
    if kind == "Summarization":
        fields = ["text", "human_summaries", "machine_summaries", "relevance"]
        rows = read_jsonl(directory / "test.jsonl", fields)
        return DatasetDict({"test": Dataset.from_dict({k: [r[k] for r in rows] for k in fields})})
    # Retrieval and Reranking
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    queries = read_jsonl(directory / "queries.jsonl", ["id", "text"])
    corpus = read_jsonl(directory / "corpus.jsonl", ["id", "text"])
    relevant = {}
    for r in read_jsonl(directory / "qrels.jsonl", ["query_id", "doc_id", "score"]):
        relevant.setdefault(str(r["query_id"]), {})[str(r["doc_id"])] = int(r["score"])
    top_ranked = None
    if (directory / "top_ranked.jsonl").is_file():
        top_ranked = {str(r["query_id"]): [str(d) for d in r["doc_ids"]]
                      for r in read_jsonl(directory / "top_ranked.jsonl", ["query_id", "doc_ids"])}
    elif kind == "Reranking":
        top_ranked = {str(q["id"]): [str(d["id"]) for d in corpus] for q in queries}
    split = RetrievalSplitData(
        queries=Dataset.from_dict({"id": [str(q["id"]) for q in queries], "text": [q["text"] for q in queries]}),
        corpus=Dataset.from_dict({"id": [str(d["id"]) for d in corpus], "text": [d["text"] for d in corpus],
                                  "title": [d.get("title") or "" for d in corpus]}),
        relevant_docs=relevant, top_ranked=top_ranked)
    return {"default": {"test": split}}


def _base_class(kind: str):
    if kind == "STS":
        from mteb.abstasks.sts import AbsTaskSTS as base
    elif kind in ("Retrieval", "Reranking"):
        from mteb.abstasks.retrieval import AbsTaskRetrieval as base
    elif kind == "Classification":
        from mteb.abstasks.classification import AbsTaskClassification as base
    elif kind == "Clustering":
        # The "legacy" clustering (k-means over each whole set) is the one MTEB English's tasks use.
        from mteb.abstasks.clustering_legacy import AbsTaskClusteringLegacy as base
    elif kind == "PairClassification":
        from mteb.abstasks.pair_classification import AbsTaskPairClassification as base
    else:
        from mteb.abstasks.text.summarization import AbsTaskSummarization as base
    return base


def load_local_task(directory):
    """An mteb task object for a local task directory (see the module docstring)."""
    from mteb.abstasks.task_metadata import TaskMetadata

    directory = pathlib.Path(directory).absolute()
    spec = read_task_json(directory)
    kind = spec["type"]
    metadata = TaskMetadata(
        name=spec["name"], description=spec.get("description", f"local {kind} task from {directory}"),
        type=kind, category="t2t", modalities=["text"], eval_splits=["test"], eval_langs=["eng-Latn"],
        main_score=spec.get("main_score", MAIN_SCORES[kind]),
        dataset={"path": f"{LOCAL_PREFIX}{directory}", "revision": "local"},
        # The task's own instruction travels as mteb's task prompt; MTEBEncoder reads it only for local tasks
        # (mteb's hub tasks carry E5-style prompts, not INSTRUCTOR's).
        prompt=_as_prompt(spec.get("instruction")),
        reference=None, date=None, domains=[], task_subtypes=[], license="not specified",
        annotations_creators="derived", dialect=[], sample_creation="created", bibtex_citation="")

    def load_data(self, num_proc=None, **kwargs) -> None:
        self.dataset = _load(directory, kind, spec)
        self.data_loaded = True

    attributes = {"metadata": metadata, "load_data": load_data, "local_directory": directory}
    if kind in ("STS", "Summarization"):
        attributes.update(min_score=spec.get("min_score", 0), max_score=spec.get("max_score", 5))
    return type(spec["name"], (_base_class(kind),), attributes)()


def _as_prompt(instruction):
    if isinstance(instruction, dict):
        return {"query": instruction.get("query", instruction.get("corpus")),
                "document": instruction.get("corpus", instruction.get("query"))}
    return instruction


def own_instruction(task_metadata):
    """A local task's own instruction as an instruction-table entry, or None (mteb's hub tasks: None)."""
    if not str(task_metadata.dataset.get("path", "")).startswith(LOCAL_PREFIX):
        return None
    prompt = task_metadata.prompt
    if isinstance(prompt, dict):
        return {"query": prompt.get("query"), "corpus": prompt.get("document")}
    return prompt


def check_local_tasks(specs=None) -> list[str]:
    """The names of the local tasks among `specs` (None: the bundled ones), each task.json checked, without
    mteb: what can be refused before mteb and a model load."""
    from instructor_jax.evaluation.instructions import BUNDLED_TASKS

    return [read_task_json(d)["name"] for spec in specs or [BUNDLED_TASKS] if pathlib.Path(spec).exists()
            for d in task_directories(spec)]


def load_tasks(specs=None) -> list:
    """mteb task objects for local task directories (or directories of them) and MTEB task names.
    None: the bundled tasks. A name is resolved by the installed mteb; its data comes from the hub when
    it is evaluated."""
    from instructor_jax.evaluation.instructions import BUNDLED_TASKS

    tasks = []
    for spec in specs or [BUNDLED_TASKS]:
        path = pathlib.Path(spec)
        if path.exists():
            tasks += [load_local_task(d) for d in task_directories(path)]
            continue
        if "/" in str(spec) or str(spec).startswith("."):
            raise FileNotFoundError(f"--tasks {spec}: no such directory")
        import mteb

        try:
            tasks.append(mteb.get_task(str(spec)))
        except KeyError:
            raise ValueError(f"--tasks {spec}: neither a local task directory nor an MTEB task name known to the "
                             f"installed mteb (see `mteb.get_tasks()`)") from None
    names = [t.metadata.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several tasks are named {duplicates}: task names must be unique")
    return tasks
