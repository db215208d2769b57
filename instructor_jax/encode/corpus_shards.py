"""One corpus encoded by every process of a multi-host job (a TPU pod slice, a GPU cluster), each its share.

Process i of N takes the bytes [line_start_at_or_after(i * size // N), line_start_at_or_after((i + 1) * size
// N)) of the input: a contiguous run of whole lines, found by reading only near its two ends, so no process
reads the whole file (a corpus can be far larger than one host's disk or memory wants to hold twice). Each
process counts its share's lines; one allgather of those counts gives every process the global number of
its first line, so ids (the line number where the input gives none) and error messages are the same as in
a single-process run. Each process then encodes its share on its own local devices (no cross-process
collective in the model: nothing to wait for but the final allgather) into its own shard file, with the
single-process partial files and resume, and process 0 writes the manifest once every shard is complete.

Every step that can fail ends in an allgather that carries each process's error, so one process's bad
line or missing file stops all of them with that message instead of leaving the others waiting forever at
the next collective. A process that dies outright (killed, out of memory) is not seen that way: the others
wait at their next allgather until JAX's heartbeat timeout gives up on it.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import logging
import os
import posixpath
from typing import Callable, Optional

import numpy as np

from instructor_jax.encode import corpus, embedding_store, fingerprint
from instructor_jax.runtime import fileio

log = logging.getLogger(__name__)

SCAN_BLOCK = 1 << 16  # bytes read at a time while looking for the next line start


# ---------------------------------------------------------------------------------------------------------
# Shares: pure functions of a seekable binary file (tests hand them io.BytesIO)


def line_start_at_or_after(f, offset: int, size: int) -> int:
    """The first line start at or after `offset`: 0, or the byte after a b"\\n" (so CRLF files split
    between lines too); `size` if no line starts there. Reads from offset - 1 to the next newline only."""
    if offset <= 0:
        return 0
    if offset >= size:
        return size
    position = offset - 1  # a newline just before `offset` makes `offset` itself a line start
    f.seek(position)
    while True:
        block = f.read(SCAN_BLOCK)
        if not block:
            return size
        found = block.find(b"\n")
        if found >= 0:
            return min(position + found + 1, size)
        position += len(block)


def share_bounds(f, size: int, index: int, count: int) -> tuple[int, int]:
    """The byte range [start, end) of share `index` of `count`: whole lines, the shares contiguous and
    disjoint, together the whole file. A share may be empty (fewer lines than processes, or one line
    longer than a share)."""
    if not 0 <= index < count:
        raise ValueError(f"share {index} of {count} does not exist")
    return (line_start_at_or_after(f, index * size // count, size),
            line_start_at_or_after(f, (index + 1) * size // count, size))


@dataclasses.dataclass(frozen=True)
class Share:
    """What process `index` of `count` encodes: bytes [start, end) of the input, whose first line is line
    `first_line` of the whole file, holding `lines` lines of which `texts` become records."""

    index: int
    count: int
    start: int
    end: int
    first_line: int = 1
    lines: int = 0
    texts: int = 0

    def settings(self) -> dict:
        """The share's part of the resume fingerprint: another split of the input is another run."""
        return {"index": self.index, "count": self.count, "bytes": [self.start, self.end],
                "first_line": self.first_line}


def plan_share(input_path, fmt: str, index: int, count: int) -> Share:
    """This process's share, its lines counted (first_line still unknown: that needs the other shares)."""
    size, _ = corpus.input_stat(input_path)
    with corpus.open_input(input_path) as f:
        start, end = share_bounds(f, size, index, count)
    lines, texts = corpus.count_lines(input_path, fmt, (start, end))
    return Share(index, count, start, end, lines=lines, texts=texts)


def number_shares(shares: list[Share]) -> list[Share]:
    """The shares with their global first line numbers, from the line counts of those before them."""
    numbered, first = [], 1
    for share in shares:
        numbered.append(dataclasses.replace(share, first_line=first))
        first += share.lines
    return numbered


# ---------------------------------------------------------------------------------------------------------
# Exchanging small values between the processes


def allgather_json(value) -> list:
    """`value` (JSON-serialisable) from every process, in process order: JSON bytes padded to one common
    length (gathered first) through jax.experimental.multihost_utils.process_allgather."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    # Padded to a power of two: each new length would compile another small gather program.
    padded = np.zeros(max(64, 1 << int(lengths.max() - 1).bit_length()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, lengths)]


@dataclasses.dataclass
class ProcessGroup:
    """This process's place among the others and how values are exchanged (replaceable in tests)."""

    index: int
    count: int
    gather: Callable[[object], list] = allgather_json

    @classmethod
    def from_jax(cls, gather: Callable[[object], list] = allgather_json) -> "ProcessGroup":
        import jax

        return cls(jax.process_index(), jax.process_count(), gather)


class OtherProcessFailed(ValueError):
    """Another process of the job failed; the message is its error."""


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if isinstance(error, (ValueError, OSError)) and text else f"{type(error).__name__}: {text}"


def step(group: ProcessGroup, work: Callable[[], object]) -> list:
    """Runs `work` here, then gathers every process's result, or its error: if any process failed, every
    process raises (this one its own error, the others that process's message)."""
    try:
        value, error = work(), None
    except Exception as e:  # noqa: BLE001 - every failure must reach the others, whatever its type
        value, error = None, e
    results = group.gather({"value": value, "error": None if error is None else _describe(error)})
    if error is not None:
        raise error
    for i, result in enumerate(results):
        if result["error"] is not None:
            raise OtherProcessFailed(f"process {i} of {group.count} failed: {result['error']}")
    return [r["value"] for r in results]


# ---------------------------------------------------------------------------------------------------------
# What is on disk already: other process counts, finished shards


def _shard_names(target) -> list[str]:
    """Names beside `target` that its glob `<stem>-*-of-*<suffix>*` matches (a bucket lists only those)."""
    directory, pattern = embedding_store.shard_glob(target)
    if fileio.is_url(directory):
        with fileio.explain_url_errors(directory, "list"):
            return [p.name for p in fileio.as_path(directory).glob(pattern)]
    return [os.path.basename(p) for p in glob.glob(os.path.join(glob.escape(directory), pattern))]


def existing_counts(output, ids=None) -> dict[int, list[str]]:
    """{process count: file names} of the shard files (finished, partial, locks, sidecars) of `output`
    and `ids` found beside them, and of the manifest: what earlier multi-process runs left."""
    found: dict[int, list[str]] = {}
    for target in filter(None, (output, ids)):
        for name in sorted(_shard_names(target)):
            # The glob is loose (its * matches anything); the name's own pattern decides.
            parsed = embedding_store.parse_shard_name(target, name)
            if parsed is not None:
                found.setdefault(parsed[1], []).append(name)
    manifest = embedding_store.manifest_path(output)
    with fileio.explain_url_errors(manifest, "read"):
        exists = fileio.as_path(manifest).exists()
    if exists:
        recorded = embedding_store.read_manifest(manifest)
        found.setdefault(int(recorded.get("num_processes", len(recorded["shards"]))), []).append(
            posixpath.basename(str(manifest)))
    return found


def check_process_count(output, ids, count: int) -> None:
    """Refuses to run with `count` processes where a run with another count left shards or a manifest:
    its shards split the input differently, so neither resuming them nor mixing them in can be right."""
    for other, names in sorted(existing_counts(output, ids).items()):
        if other == count:
            continue
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        here = "1 process" if count == 1 else f"{count} processes"
        raise ValueError(f"{embedding_store.parent_directory(output)} holds files of a {other}-process encode of "
                         f"{output} ({shown}); "
                         f"this run has {here}. Rerun with {other} processes (with --resume to continue it), "
                         f"or delete those files to start over with {here}")


def is_complete(shard) -> bool:
    """A finished shard: its file and its completion sidecar (written before the shard is renamed into
    place, uploaded after it: a shard without one was never finished)."""
    return all(fileio.as_path(p).exists() for p in (shard, embedding_store.completion_path(shard)))


def shard_damage(shard, rows: int, dim: int, store_dtype: str) -> Optional[str]:
    """What is wrong with a finished shard's file (cut short, grown, or a header numpy cannot read), or None
    when it holds the `rows` its completion sidecar records."""
    expected = embedding_store.NPY_HEADER_BYTES + rows * dim * embedding_store.store_dtype(store_dtype).itemsize
    with fileio.explain_url_errors(shard, "read"):
        size = corpus.input_stat(shard)[0]
    if size != expected:
        return f"{size} bytes, where {rows} rows of dim {dim} take {expected}"
    if not fileio.is_url(shard):
        try:
            embedding_store.load_npy(shard)
        except embedding_store.DamagedFile as e:
            return str(e)
    return None


def _read_completion(shard) -> corpus.Progress:
    path = embedding_store.completion_path(shard)
    try:
        return corpus.Progress(**json.loads(fileio.as_path(path).read_text()))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path} cannot be read ({e}); delete it and {shard} and rerun with --resume") from None


# ---------------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class ShardedResult:
    share: Share
    progress: corpus.Progress  # this process's shard
    shard: str
    skipped: bool  # finished before (--resume): not encoded again
    rows_total: int
    manifest: str


def _settings_digest(settings: dict, input_size: int) -> str:
    return hashlib.sha256(json.dumps([settings, input_size], sort_keys=True).encode()).hexdigest()[:16]


def encode_sharded(load_model: Callable[[], object], input_path, output_path, group: ProcessGroup, *,
                   ids_path=None, instruction: Optional[str] = None, fmt: Optional[str] = None,
                   batch_size: int = 64, chunk_size: int = 8192, dtype: Optional[str] = None,
                   normalize: bool = True, skip_bad_lines: bool = False, resume: bool = False,
                   overwrite: bool = False, show_progress_bar: bool = True, packing: Optional[bool] = None,
                   store_dtype: str = "float32") -> ShardedResult:
    """This process's share of `input_path` into its shard of `output_path`; process 0 then writes the
    manifest. Every process of `group` calls it with the same arguments. `load_model()` gives the
    Instructor (called after the checks that need no model passed on every process)."""
    input_path = str(input_path)
    fmt = fmt or corpus.default_format(input_path)
    index, count = group.index, group.count
    shard = embedding_store.shard_path(output_path, index, count)
    shard_ids = None if ids_path is None else embedding_store.shard_path(ids_path, index, count)
    manifest = embedding_store.manifest_path(output_path)

    def check_and_count() -> dict:
        if fmt not in ("jsonl", "text"):
            raise ValueError(f"input format must be 'jsonl' or 'text', got {fmt!r}")
        embedding_store.store_dtype(store_dtype)
        if not corpus.is_input_file(input_path):
            raise FileNotFoundError(f"--input {input_path} does not exist or is not a file")
        if fmt == "text" and instruction is None:
            raise corpus.CorpusError("plain-text input needs --instruction (an empty string means no instruction)")
        check_process_count(output_path, ids_path, count)
        if fileio.as_path(manifest).exists() and not (overwrite or resume):
            raise FileExistsError(f"{manifest} already exists (a finished {count}-process encode); pass "
                                  "--overwrite to encode again, replacing it and its shards")
        if not (resume and is_complete(shard)):
            # Under --resume, a shard left without its sidecar is not finished: it is encoded again.
            corpus.check_outputs(shard, shard_ids, overwrite or resume, resume, input_path=input_path)
        return dataclasses.asdict(plan_share(input_path, fmt, index, count))

    shares = number_shares([Share(**s) for s in step(group, check_and_count)])
    share = shares[index]
    log.info("process %d of %d: bytes [%d, %d) of %s, %d lines from line %d", index, count, share.start,
             share.end, input_path, share.lines, share.first_line)

    holder = {}

    def load() -> str:
        model = holder["model"] = load_model()
        if overwrite and index == 0 and fileio.as_path(manifest).exists():
            # The old manifest would describe shards about to be replaced: gone before any is.
            fileio.as_path(manifest).unlink()
        settings = corpus.run_settings(model, corpus.check_buckets(model.buckets, model.config.max_seq_length),
                                       dtype=dtype, packing=packing, normalize=normalize, instruction=instruction,
                                       fmt=fmt, ids=ids_path is not None, store=store_dtype)
        return _settings_digest(settings, corpus.input_stat(input_path)[0])

    digests = step(group, load)
    if len(set(digests)) > 1:
        differ = [i for i, d in enumerate(digests) if d != digests[0]]
        raise ValueError(f"process(es) {differ} of {count} run with other settings, model or input than process "
                         "0; every process must run the same command on the same files")
    model = holder["model"]

    def encode() -> dict:
        damage = None
        if resume and is_complete(shard):
            saved = _read_completion(shard)
            damage = shard_damage(shard, saved.rows_done, model.dim, store_dtype)
        if damage is not None:
            # Its sidecar goes first: an interrupted re-encode then leaves an unfinished shard, never this one.
            log.warning("%s is damaged (%s): encoding it again", shard, damage)
            fileio.as_path(embedding_store.completion_path(shard)).unlink()
        elif resume and is_complete(shard):
            buckets = corpus.check_buckets(model.buckets, model.config.max_seq_length)
            current = corpus.new_progress(input_path, corpus.run_settings(
                model, buckets, dtype=dtype, packing=packing, normalize=normalize, instruction=instruction,
                fmt=fmt, ids=ids_path is not None, store=store_dtype, share=share))
            differences = saved.differences(current)
            if not fingerprint.same_weights(saved.weights, model):
                differences.insert(0, "the model's weights (their contents changed)")
            if differences:
                raise ValueError(f"{shard} was made by a different run: {'; '.join(differences)}. Resume with "
                                 "what made it, or pass --overwrite (not --resume) to encode again")
            if shard_ids is not None and not fileio.as_path(shard_ids).exists():
                raise FileNotFoundError(f"{shard} is finished but its ids file {shard_ids} is missing; pass "
                                        "--overwrite (not --resume) to encode again")
            log.warning("%s is finished already (%d embeddings); not encoding it again", shard, saved.rows_done)
            holder["skipped"] = True
            return dataclasses.asdict(saved)
        # Under --resume a shard file without its sidecar was never finished: it is replaced.
        exists_ok = overwrite or resume
        sidecar = fileio.as_path(embedding_store.completion_path(shard))
        if overwrite and sidecar.exists():
            # The shard being replaced is no longer finished: an interrupted --overwrite then resumes
            # (--resume) from its partial files instead of keeping the old shard.
            sidecar.unlink()
        progress = corpus.encode_corpus(model, input_path, shard, instruction=instruction, fmt=fmt,
                                        ids_path=shard_ids, batch_size=batch_size, chunk_size=chunk_size,
                                        dtype=dtype, normalize=normalize, skip_bad_lines=skip_bad_lines,
                                        resume=resume, overwrite=exists_ok, show_progress_bar=show_progress_bar,
                                        packing=packing, store_dtype=store_dtype, share=share)
        return dataclasses.asdict(progress)

    results = [corpus.Progress(**p) for p in step(group, encode)]

    def write_manifest() -> None:
        if index == 0:
            embedding_store.write_manifest(manifest, make_manifest(output_path, ids_path, shares, results,
                                                                   model.dim, store_dtype))

    step(group, write_manifest)
    return ShardedResult(share, results[index], shard, holder.get("skipped", False),
                         sum(p.rows_done for p in results), manifest)


def make_manifest(output_path, ids_path, shares: list[Share], results: list[corpus.Progress], dim: int,
                  store_dtype: str) -> dict:
    """The manifest's contents: the shards in input order, with what each covers, and the fingerprint."""
    base = embedding_store.parent_directory(embedding_store.manifest_path(output_path))
    first = results[0]
    settings = {k: v for k, v in first.settings.items() if k != "share"}
    shards = []
    for share, progress in zip(shares, results):
        ids = None if ids_path is None else embedding_store.shard_path(ids_path, share.index, share.count)
        shards.append({
            "embeddings": embedding_store.relative_to(embedding_store.shard_path(output_path, share.index,
                                                                                 share.count), base),
            "ids": None if ids is None else embedding_store.relative_to(ids, base),
            "rows": progress.rows_done, "skipped": progress.skipped, "truncated": progress.truncated,
            "first_line": share.first_line, "lines": share.lines, "bytes": [share.start, share.end]})
    return {"format": embedding_store.MANIFEST_FORMAT, "version": embedding_store.MANIFEST_VERSION,
            "rows": sum(p.rows_done for p in results), "dim": dim, "store_dtype": store_dtype,
            "num_processes": len(shares),
            "input": {"path": first.input, "size": first.input_size, "mtime": first.input_mtime},
            "settings": settings, "weights": first.weights, "shards": shards}
