"""Every embedding a `data mine` run needs, computed once, up front, by `encode`'s own machinery.

The distinct [instruction, text] items of the run (each group's queries and corpus, the held-out pairs'
documents and queries, or the recipe's inputs and outputs) are written as `texts.jsonl` in a work
directory (default: OUTPUT.work) and encoded with `instructor_jax.encode.corpus_shards.encode_sharded`,
so that mining inherits what `encode` does:

- in a job of several processes each process encodes only its share (a byte range of `texts.jsonl`),
  into its own shard; the rows are then read from the shards where every process can see them all (a
  shared filesystem), or else exchanged between the processes;
- an interrupted run keeps what it encoded (after every chunk); `--resume` continues it, and reuses a
  finished encoding outright (when the texts, the model's weights and the settings are the same), so that
  mining again with other filters costs no encoding;
- packing, length buckets, progress bars and the checks of a run's files are encode's.

The work directory holds a marker file naming it as this program's, so that a directory holding anything
else is never written into.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

log = logging.getLogger(__name__)

TEXTS = "texts.jsonl"
EMBEDDINGS = "embeddings.npy"
MARKER = "instructor_jax_mine_work.json"


def default_work_dir(output) -> pathlib.Path:
    return pathlib.Path(str(output) + ".work")


def distinct(items: Iterable[Sequence[str]]) -> list[tuple[str, str]]:
    """(instruction, text) items, each once, in order of first appearance."""
    return list(dict.fromkeys((str(i), str(t)) for i, t in items))


def texts_file_bytes(items: Sequence[tuple[str, str]]) -> bytes:
    # ASCII-escaped JSON: no text can hold a character that some reader takes for a line break.
    return "".join(json.dumps({"instruction": i, "text": t}) + "\n" for i, t in items).encode()


def prepare_work_dir(work_dir, items: Sequence[tuple[str, str]], resume: bool) -> pathlib.Path:
    """Creates (or checks) the work directory and writes `texts.jsonl` unless it holds these items already
    (a resume's encoding compares the file's size and time with the interrupted run's). Returns its path."""
    work = pathlib.Path(work_dir)
    if work.exists() and not work.is_dir():
        raise NotADirectoryError(f"--work_dir {work} is a file; give a directory (it will hold the embeddings)")
    marker = work / MARKER
    if work.is_dir() and any(work.iterdir()) and not marker.exists():
        raise FileExistsError(f"--work_dir {work} holds files this program did not write; give an empty or new "
                              "directory")
    work.mkdir(parents=True, exist_ok=True)
    if not marker.exists():
        marker.write_text(json.dumps({"written_by": "instructor-jax data mine"}) + "\n")
    texts = work / TEXTS
    data = texts_file_bytes(items)
    if texts.exists() and texts.read_bytes() == data:
        return texts
    if resume and texts.exists():
        raise ValueError(f"--resume: the texts to embed are not those of the run that left {work} (the pairs, "
                         "--corpus, --holdout or the instructions changed); run without --resume to embed anew")
    staging = work / f"{TEXTS}.{os.getpid()}.tmp"
    staging.write_bytes(data)
    os.replace(staging, texts)
    return texts


def _single_process_group():
    from instructor_jax.encode.corpus_shards import ProcessGroup

    return ProcessGroup(0, 1, lambda value: [value])


def encode_items(model, items: Sequence[tuple[str, str]], work_dir, *, resume: bool = False, batch_size: int = 64,
                 group=None, show_progress_bar: bool = True, chunk_size: int = 8192) -> tuple[np.ndarray, dict]:
    """The unit-norm embeddings of `items` ([len(items), dim] float32, in their order) and what was done
    ({"texts", "encoded", "reused"}). Every process of `group` (default: this process alone) calls it with
    the same items."""
    from instructor_jax.encode import corpus_shards, embedding_store

    group = group or _single_process_group()
    texts = corpus_shards.step(group, lambda: str(prepare_work_dir(work_dir, items, resume)))[group.index]
    output = pathlib.Path(work_dir) / EMBEDDINGS
    before = _rows_done_before(embedding_store.shard_path(output, group.index, group.count)) if resume else 0
    result = corpus_shards.encode_sharded(lambda: model, texts, output, group, batch_size=batch_size,
                                          resume=resume, overwrite=not resume, show_progress_bar=show_progress_bar,
                                          chunk_size=chunk_size)
    if result.rows_total != len(items):
        raise RuntimeError(f"encoded {result.rows_total} rows for {len(items)} texts in {texts}")
    vectors = gather_rows(result, group)
    # Rows this run encoded (a resumed shard's rows_done counts those of before the interruption too).
    here = 0 if result.skipped else result.progress.rows_done - before
    encoded = sum(corpus_shards.step(group, lambda: here))
    return vectors, {"texts": len(items), "encoded": encoded, "reused": len(items) - encoded}


def _rows_done_before(shard) -> int:
    """Rows an interrupted run left in `shard`'s partial files (encode resumes after them)."""
    try:
        return int(json.loads(pathlib.Path(f"{shard}.partial.json").read_text()).get("rows_done", 0))
    except (OSError, ValueError):
        return 0


def gather_rows(result, group) -> np.ndarray:
    """Every shard's rows, in order, on every process: read from the manifest where each process can open
    every shard, else each process reads its own and they are exchanged."""
    from instructor_jax.encode import corpus_shards, embedding_store

    def can_read_all() -> bool:  # process 0 writes the manifest: another host may not see it either
        return pathlib.Path(result.manifest).exists() and all(p.exists() for p in _shard_files(result.manifest))

    if all(corpus_shards.step(group, can_read_all)):
        return np.asarray(embedding_store.open_embeddings(result.manifest), np.float32)
    own = np.asarray(embedding_store.load_npy(result.shard), np.float32)
    return _allgather_rows(own)


def _shard_files(manifest) -> list[pathlib.Path]:
    from instructor_jax.encode import embedding_store

    base = pathlib.Path(manifest).parent
    return [base / shard["embeddings"] for shard in embedding_store.read_manifest(manifest)["shards"]]


def _allgather_rows(own: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.array([len(own)], np.int64))).reshape(-1)
    padded = np.zeros((int(counts.max()), own.shape[1]), np.float32)
    padded[:len(own)] = own
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([rows[:n] for rows, n in zip(gathered, counts)])


class Embedder:
    """[instruction, text] pairs -> unit-norm embeddings, looked up in the run's encoded table. An item the
    table lacks (a planning mistake, never expected) is encoded on the spot, counted in `encoded_late`."""

    def __init__(self, model, items: Sequence[tuple[str, str]] = (), vectors: Optional[np.ndarray] = None,
                 batch_size: int = 64):
        self.model, self.batch_size, self.encoded_late = model, batch_size, 0
        self.row = {key: i for i, key in enumerate(items)}
        self.vectors = vectors if vectors is not None else np.zeros((0, model.dim), np.float32)

    def __call__(self, items) -> np.ndarray:
        keys = [(str(i), str(t)) for i, t in items]
        missing = list(dict.fromkeys(k for k in keys if k not in self.row))
        if missing:
            log.warning("%d texts were not embedded up front; encoding them now", len(missing))
            self.encoded_late += len(missing)
            found = self.model.encode([list(k) for k in missing], batch_size=self.batch_size, show_progress_bar=False)
            self.row.update({k: len(self.vectors) + i for i, k in enumerate(missing)})
            self.vectors = np.concatenate([self.vectors, found])
        if not keys:
            return np.zeros((0, self.vectors.shape[1]), np.float32)
        return self.vectors[[self.row[k] for k in keys]]


def embedder_for(model, items, work_dir, *, resume: bool, batch_size: int, group=None,
                 show_progress_bar: bool = True) -> tuple[Callable, dict]:
    """An Embedder over `items`, encoded in `work_dir` (see `encode_items`), and the counts."""
    items = distinct(items)
    vectors, counts = encode_items(model, items, work_dir, resume=resume, batch_size=batch_size, group=group,
                                   show_progress_bar=show_progress_bar)
    return Embedder(model, items, vectors, batch_size), counts
