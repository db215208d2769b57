"""Reading `data mine`'s inputs: pairs, recipe examples and a corpus file, checked line by line.

Pairs (one JSON object per line): `{"query": str, "positive": str or [str, ...], "task"?: str,
"query_instruction"?: str, "document_instruction"?: str}`; the instructions default to the flags. Recipe
examples: `{"input": str, "output": str, "task"?}` (`--recipe outputs`) or `{"input": str, "label": str or
int, "task"?}` (`--recipe labels`). A corpus: JSONL `{"text": str, "id"?: ...}` or plain text, one per line.

Errors name the file and line and say what to do; nothing is written before every line has been read.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

DEFAULT_TASK = "mined"

from instructor_jax.runtime import jsonl


@dataclasses.dataclass(frozen=True)
class Pair:
    """One query with its positives, as the input gave them (a line)."""

    line: int
    query: str
    positives: tuple[str, ...]
    task: str
    query_instruction: str
    document_instruction: str


@dataclasses.dataclass(frozen=True)
class Example:
    """One recipe example: an input with its output (or its label)."""

    line: int
    input: str
    target: object
    task: str
    query_instruction: str
    document_instruction: str


def json_lines(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line; a line that is not a JSON object is an error."""
    for number, row in jsonl.numbered_lines(path, hint="; each line must be one JSON object"):
        if not isinstance(row, dict):
            raise ValueError(f"{path}, line {number}: a JSON {type(row).__name__}, not an object")
        yield number, row


def _string(row: dict, key: str, where: str, default: Optional[str] = None, flag: Optional[str] = None) -> str:
    value = row.get(key, default)
    if value is None:
        extra = f" (and no {flag} to use instead)" if flag else ""
        raise ValueError(f"{where}: no {key!r}{extra}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {key!r} is a {type(value).__name__}, not a string")
    return value


def _instructions(row: dict, where: str, query_instruction, document_instruction) -> tuple[str, str]:
    query = _string(row, "query_instruction", where, query_instruction, "--query_instruction")
    document = _string(row, "document_instruction", where, document_instruction if document_instruction is not None
                       else query_instruction, "--document_instruction")
    return query, document


def read_pairs(path, query_instruction=None, document_instruction=None, task=DEFAULT_TASK) -> list[Pair]:
    """Every line of a pairs file; a line without a positive (missing, empty, not text) is an error."""
    pairs = []
    for number, row in json_lines(path):
        where = f"{path}, line {number}"
        query = _string(row, "query", where)
        positives = row.get("positive")
        if isinstance(positives, str):
            positives = [positives]
        if not positives or not isinstance(positives, list):
            raise ValueError(f"{where}: no positive; every line needs 'positive': a text or a non-empty list of "
                             "texts (drop the line, or give its positive)")
        if not all(isinstance(p, str) and p for p in positives):
            raise ValueError(f"{where}: every positive must be a non-empty string")
        if not query:
            raise ValueError(f"{where}: the query is empty")
        instructions = _instructions(row, where, query_instruction, document_instruction)
        pairs.append(Pair(number, query, tuple(positives), _string(row, "task", where, task), *instructions))
    if not pairs:
        raise ValueError(f"--input {path} holds no pair")
    return pairs


def read_examples(path, recipe: str, query_instruction=None, document_instruction=None,
                  task=DEFAULT_TASK) -> list[Example]:
    """The lines of a recipe file: `input` with `output` (recipe "outputs") or `label` (recipe "labels")."""
    key = {"outputs": "output", "labels": "label"}[recipe]
    examples = []
    for number, row in json_lines(path):
        where = f"{path}, line {number}"
        text = _string(row, "input", where)
        if key not in row:
            raise ValueError(f"{where}: no {key!r}; --recipe {recipe} needs {{\"input\", \"{key}\"}} on every line")
        target = row[key]
        if recipe == "outputs" and not isinstance(target, str):
            raise ValueError(f"{where}: 'output' is a {type(target).__name__}, not a string")
        if recipe == "labels" and (not isinstance(target, (str, int)) or isinstance(target, bool)):
            raise ValueError(f"{where}: 'label' must be a string or an integer")
        instructions = _instructions(row, where, query_instruction, document_instruction)
        examples.append(Example(number, text, target, _string(row, "task", where, task), *instructions))
    if not examples:
        raise ValueError(f"--input {path} holds no example")
    return examples


def read_corpus(path) -> list[str]:
    """The texts of a corpus file (JSONL with 'text', else one text per line); ids, if given, must be unique."""
    texts, ids = [], {}
    if str(path).endswith((".jsonl", ".json")):
        for number, row in json_lines(path):
            texts.append(_string(row, "text", f"{path}, line {number}"))
            if "id" in row:
                if row["id"] in ids:
                    raise ValueError(f"{path}, line {number}: the id {row['id']!r} was already used on line "
                                     f"{ids[row['id']]}; corpus ids must be unique")
                ids[row["id"]] = number
    else:
        with open(path, encoding="utf-8-sig") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
    if not texts:
        raise ValueError(f"--corpus {path} is empty: give a corpus with at least one text, or leave --corpus out "
                         "to mine among the positives")
    return texts


def group_key(item) -> tuple[str, str]:
    """Items mined together: one task, one document instruction (the corpus is embedded with it)."""
    return item.task, item.document_instruction


def grouped(items) -> dict:
    """{(task, document instruction): [items]} in the order of first appearance."""
    groups: dict = {}
    for item in items:
        groups.setdefault(group_key(item), []).append(item)
    return groups
