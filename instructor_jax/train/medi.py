"""MEDI files: the training format, read and written (JSON list or JSONL; ArrayRecord for random access).

MEDI is a JSON list of `{"query": [instruction, text], "pos": [...], "neg": [...], "task_id": int}` (older
files: `task_name`); JSONL with one such object per line reads the same. `query`, `pos` and each negative
are [instruction, text] pairs; the task names the batch a record may share (the trainer's batches hold one
task each).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import pathlib
from typing import Any, Iterable, Sequence

import grain

from instructor_jax.model.tokenization import lone_surrogate
from instructor_jax.runtime import fileio

log = logging.getLogger(__name__)

INSTRUCTION_PREFIX = "Represent "
Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Example:
    """One MEDI triple: [instruction, text] pairs for the query, its positive and its hard negatives."""

    query: Pair
    pos: Pair
    negs: tuple[Pair, ...]
    task: str


# ---------------------------------------------------------------------------------------------------------
# Reading MEDI files


class _BadRecord(ValueError):
    """What is wrong with one record; `read_medi` adds the file and the record index."""


def _pair(value, what: str) -> Pair:
    if not isinstance(value, (list, tuple)):
        raise _BadRecord(f"{what} is a {type(value).__name__}, not an [instruction, text] pair")
    if len(value) != 2:
        raise _BadRecord(f"{what} has {len(value)} elements, not 2 ([instruction, text])")
    for part, item in zip(("instruction", "text"), value):
        if not isinstance(item, str):
            raise _BadRecord(f"the {part} of {what} is a {type(item).__name__}, not a string")
        problem = lone_surrogate(item)
        if problem:
            raise _BadRecord(f"the {part} of {what} {problem}")
    return value[0], value[1]


def _negatives(value) -> tuple[Pair, ...]:
    """`neg` is one [instruction, text] pair (MEDI) or a list of them; [] means no hard negative."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, str) for v in value):
        return (_pair(value, "neg"),)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (list, tuple)) for v in value):
        return tuple(_pair(v, f"neg[{k}]") for k, v in enumerate(value))
    raise _BadRecord(f"neg is neither an [instruction, text] pair nor a list of pairs: {str(value)[:80]}")


def _task(record: dict) -> str:
    # MEDI names tasks by `task_id`; older files by `task_name`. bool is an int in Python: refuse it.
    if "task_id" in record:
        task = record["task_id"]
        if not isinstance(task, int) or isinstance(task, bool):
            raise _BadRecord(f"task_id is a {type(task).__name__}, not an int")
        return str(task)
    if "task_name" in record:
        task = record["task_name"]
        if not isinstance(task, str):
            raise _BadRecord(f"task_name is a {type(task).__name__}, not a string")
        return task
    raise _BadRecord("missing key 'task_id' (or 'task_name')")


def parse_record(record: Any) -> Example:
    """One decoded MEDI record -> Example; raises ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise _BadRecord(f"is a {type(record).__name__}, not a JSON object")
    for key in ("query", "pos", "neg"):
        if key not in record:
            raise _BadRecord(f"missing key {key!r}")
    return Example(_pair(record["query"], "query"), _pair(record["pos"], "pos"), _negatives(record["neg"]),
                   _task(record))


def _decode(path: pathlib.Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}: byte {e.start} (line {line}) is not valid UTF-8 ({e.reason}); MEDI files "
                         "are UTF-8 JSON: re-encode the file, e.g. `iconv -f latin1 -t utf-8`") from None


def _records(path: pathlib.Path, text: str) -> Iterable[tuple[str, Any]]:
    """(where, decoded record or _BadRecord) for each record; `where` names it for error messages."""
    body = text.lstrip()
    if path.suffix != ".jsonl" and body.startswith("["):  # MEDI proper: one big JSON list
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        yield from ((f"record {i}", r) for i, r in enumerate(records))
        return
    index = 0
    # "\n" alone ends a JSONL line: str.splitlines would also split at U+2028, U+0085 and other characters that
    # JSON allows raw inside a string (json.dumps(..., ensure_ascii=False) writes them so).
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            record = _BadRecord(f"invalid JSON at column {e.colno}: {e.msg}")
        yield f"record {index} (line {number})", record
        index += 1


SKIP_BAD_HINT = "pass skip_bad=True"
# What a training run's error says: there the setting is TrainConfig's.
TRAIN_SKIP_BAD_HINT = "set TrainConfig.skip_bad_records = True (--gin_bindings 'TrainConfig.skip_bad_records = True')"


def read_medi(path, skip_bad: bool = False, skip_hint: str = SKIP_BAD_HINT) -> list[Example]:
    """Reads a MEDI file: a JSON list (`.json`, as MEDI ships) or JSON Lines (`.jsonl`), UTF-8.

    A malformed record raises ValueError naming the file and the record (0-based index, and the line in
    JSONL), and `skip_hint`, the way the caller's user asks to skip such records; with `skip_bad=True` they
    are skipped and counted in one warning.
    """
    path = fileio.as_path(path)  # a local path, or a URL such as gs://bucket/medi-data.json
    with fileio.explain_url_errors(path, "read"):
        raw = path.read_bytes()
    text = _decode(path, raw)
    examples, skipped, first_error, unprefixed = [], 0, None, 0
    for where, record in _records(path, text):
        try:
            if isinstance(record, _BadRecord):
                raise record
            example = parse_record(record)
        except _BadRecord as e:
            if not skip_bad:
                raise ValueError(f"{path}: {where}: {e}. Fix or remove the record, or {skip_hint} to skip "
                                 "malformed records") from None
            skipped += 1
            first_error = first_error or f"{where}: {e}"
            continue
        examples.append(example)
        if not all(i.startswith(INSTRUCTION_PREFIX) for i, _ in (example.query, example.pos, *example.negs)):
            unprefixed += 1
    if skipped:
        log.warning("%s: skipped %d malformed records (the first: %s)", path, skipped, first_error)
    if unprefixed:
        # One warning, not one per record: a whole file written with another template is one problem.
        log.warning("%s: %d of %d records have an instruction that does not start with %r; INSTRUCTOR's "
                    "instructions read 'Represent the (domain) text_type for task_objective: '",
                    path, unprefixed, len(examples), INSTRUCTION_PREFIX)
    return examples


# ---------------------------------------------------------------------------------------------------------
# ArrayRecord: random access to corpora too large to parse at every start (no TensorFlow needed)


def _tasks_index_path(path) -> pathlib.Path:
    return pathlib.Path(f"{path}.tasks.json")


def write_array_record(examples: Sequence[Example], path) -> None:
    """One JSON-encoded MEDI record per example, plus `<path>.tasks.json`, the tasks in record order
    (run-length encoded) so that batching need not read every record."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")  # group_size 1: cheapest random reads
    runs: list[list] = []
    for example in examples:
        record = {"query": list(example.query), "pos": list(example.pos),
                  "neg": [list(n) for n in example.negs], "task_name": example.task}
        writer.write(json.dumps(record, ensure_ascii=False).encode("utf-8"))
        if runs and runs[-1][0] == example.task:
            runs[-1][1] += 1
        else:
            runs.append([example.task, 1])
    writer.close()
    _tasks_index_path(path).write_text(json.dumps({"num_records": len(examples), "runs": runs}))


class MediArrayRecordSource:
    """Random-access Examples from a file `write_array_record` made (a grain RandomAccessDataSource);
    usable wherever this module takes `examples`."""

    def __init__(self, path):
        self.path = pathlib.Path(path)
        self._source = grain.sources.ArrayRecordDataSource(str(self.path))

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Example:
        try:
            return parse_record(json.loads(self._source[index]))
        except (_BadRecord, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{self.path}: record {index}: {e}") from None

    @functools.cached_property
    def tasks(self) -> list[str]:
        index = _tasks_index_path(self.path)
        if not index.exists():
            log.info("%s not found: reading every record for its task", index)
            return [self[i].task for i in range(len(self))]
        data = json.loads(index.read_text())
        tasks = [task for task, count in data["runs"] for _ in range(count)]
        if len(tasks) != len(self):
            raise ValueError(f"{index} lists {len(tasks)} records but {self.path} holds {len(self)}; "
                             "rewrite both with tools/medi_to_array_record.py")
        return tasks
