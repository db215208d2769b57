"""Which instruction INSTRUCTOR gives each MTEB task, from the reference's own table or the user's.

The table (assets/eval/instructor_mteb_instructions.json) was extracted from the reference repository's
evaluation code; its `_source` line says from where. It holds one table per released size
("hkunlp/instructor-base", "-large", "-xl"; the sizes differ on many tasks). Each entry is a string, or
for retrieval and reranking {"query": ..., "corpus": ...}. A user's file has the same shape: either
{task: entry} or {model name: {task: entry}} (then name the table with FILE::NAME if it holds several).
No mteb import here.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Union

ASSETS = pathlib.Path(__file__).parents[1] / "assets"
REFERENCE_TABLE = ASSETS / "eval" / "instructor_mteb_instructions.json"
BUNDLED_TASKS = ASSETS / "eval_tasks"  # the small offline set (tools/make_eval_tasks.py)
BUNDLED_PARAPHRASES = BUNDLED_TASKS / "paraphrases.json"

# MTEB English (56 datasets), leaderboard figures for the released models, per category (mean main score
# x 100 over the category's tasks; "average" over all 56), as the paper and leaderboard report them.
CATEGORIES = ("Classification", "Clustering", "PairClassification", "Reranking", "Retrieval", "STS",
              "Summarization")
LEADERBOARD = {
    "hkunlp/instructor-xl": dict(zip(("average", *CATEGORIES), (61.79, 73.12, 44.74, 86.62, 57.29, 49.26, 83.06, 32.32))),
    "hkunlp/instructor-large": dict(zip(("average", *CATEGORIES), (61.59, 73.86, 45.29, 85.89, 57.54, 47.57, 83.15, 31.84))),
    "hkunlp/instructor-base": dict(zip(("average", *CATEGORIES), (59.54, 72.36, 41.90, 83.51, 56.20, 45.12, 82.29, 29.85))),
    "sentence-transformers/gtr-t5-large": dict(zip(("average", *CATEGORIES), (58.28, 67.14, 41.60, 85.32, 55.36, 47.42, 78.19, 29.50))),
}

Entry = Union[str, dict]


class MissingInstruction(ValueError):
    """A task has no instruction (and no default was asked for): a user error, shown as one line."""


def _looks_like_entry(value) -> bool:
    """A string, or a dict keyed by query / corpus (a table's values are dicts keyed by task names)."""
    return isinstance(value, str) or (isinstance(value, dict) and bool(value) and set(value) <= {"query", "corpus"})


def _is_entry(value) -> bool:
    return _looks_like_entry(value) and (isinstance(value, str) or all(isinstance(v, str) for v in value.values()))


def _table_of(data: dict, origin: str, name: Optional[str]) -> dict:
    data = {k: v for k, v in data.items() if not k.startswith("_")}  # _source and other notes
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and not _looks_like_entry(v)}
    if name is not None:
        if name not in tables:
            raise ValueError(f"{origin} has no table {name!r}; it has {sorted(tables) or 'one unnamed table'}")
        data = tables[name]
    elif tables:
        if len(tables) > 1 or len(tables) != len(data):
            raise ValueError(f"{origin} holds the tables {sorted(tables)}: choose one with {origin}::NAME")
        data = next(iter(tables.values()))
    bad = [task for task, entry in data.items() if not _is_entry(entry)]
    if bad:
        raise ValueError(f"{origin}: the instruction of {bad[0]} must be a string or {{\"query\": ..., "
                         "\"corpus\": ...}")
    return dict(data)


def load_instructions(spec) -> dict:
    """{task name: entry} from a model name of the reference's table ("hkunlp/instructor-large"), a JSON file
    (FILE or FILE::TABLE), a dict, or None (no table: tasks use their own instructions)."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        return _table_of(spec, "the instructions", None)
    spec = str(spec)
    reference = json.loads(REFERENCE_TABLE.read_text())
    if spec in reference and not spec.startswith("_"):
        return _table_of(reference, str(REFERENCE_TABLE), spec)
    path, _, name = spec.partition("::")
    if not pathlib.Path(path).is_file():
        sizes = ", ".join(k for k in reference if not k.startswith("_"))
        raise FileNotFoundError(f"--instructions {spec}: not a JSON file nor one of the reference's tables ({sizes})")
    try:
        data = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"--instructions {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--instructions {path} must hold a JSON object of task -> instruction")
    return _table_of(data, path, name or None)


def instruction_for(table: dict, task_name: str, prompt_type: Optional[str], own: Optional[Entry] = None,
                    default: Optional[str] = None) -> str:
    """The instruction for `task_name` and mteb's prompt type ("query", "document" or None).

    Looked up in `table`, then the task's `own` instruction (a local task's task.json), then `default`;
    none of them is an error that names the task and the flags that fix it. A retrieval entry's "corpus"
    serves documents, its "query" everything else; a string serves both."""
    entry = table.get(task_name, own)
    if entry is None:
        if default is None:
            raise MissingInstruction(
                f"no instruction for the task {task_name}: give one with --instructions (a JSON file of task -> "
                "instruction, or one of the reference's tables: hkunlp/instructor-base, -large, -xl), or ask for "
                "one instruction for every such task with --default_instruction TEXT (\"\" for none)")
        entry = default
    if isinstance(entry, str):
        return entry
    if prompt_type == "document":
        return entry.get("corpus", entry.get("query"))
    return entry.get("query", entry.get("corpus"))
