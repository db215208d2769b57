"""Encoding a corpus file into a .npy, streamed in chunks, resumable, never leaving a file that looks done.

Input: JSONL (`{"instruction": ..., "text": ..., "id": ...}` per line; `--instruction` fills in for lines
without one) or plain text (one text per line, with `--instruction`). Output: OUT.npy [n, dim] in input
order (float32, or the `store_dtype` float16/bfloat16; see instructor_jax.encode.embedding_store), and optionally
the ids, one per line. Input and output may be URLs (gs://): the input is read through etils.epath, the
output written in a local staging directory and uploaded when complete.

While running, rows go to `OUT.partial` (a .npy whose header is written last) and progress to
`OUT.partial.json` after every chunk, each chunk flushed to disk first. An interrupted run leaves only
those; `--resume` continues from them, if they were made with the same input, weights and settings;
success renames `OUT.partial` to OUT. `OUT.lock` keeps a second run off the same output meanwhile.

A multi-process run (instructor_jax.encode.corpus_shards) calls `encode_corpus` once per process with a `share`:
a byte range of the input, starting at a line start, whose first line has a known global number. Each
share is one shard file with the same partial files, and a completion sidecar `SHARD.json`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Iterator, Optional

from tqdm.auto import tqdm

from instructor_jax.runtime import fileio, locks
from instructor_jax.encode import fingerprint
from instructor_jax.encode.embedding_store import (NPY_HEADER_BYTES, completion_path, copy_file, write_npy_header,
                                                  write_text_atomically)
from instructor_jax.encode.embedding_store import store_dtype as storage_dtype
from instructor_jax.encode.batch_encoder import prefetch
from instructor_jax.model.tokenization import check_bucket_values, lone_surrogate

log = logging.getLogger(__name__)

# Characters that end a line for some reader (str.splitlines): an id holding one breaks the ids file's
# one-id-per-line layout, and with it --resume, which counts lines.
LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")


class CorpusError(ValueError):
    """A corpus line cannot be read; the message gives the file and line number."""


@dataclasses.dataclass
class Record:
    line: int  # 1-based line number in the input
    id: Optional[str]
    instruction: Optional[str]
    text: Optional[str]
    error: Optional[str] = None  # set for a bad line read with skip_bad_lines


def _parse_line(raw: bytes, line: int, path: str, fmt: str, instruction: Optional[str],
                check_ids: bool = False) -> Record:
    try:
        # A byte-order mark may start the file (Windows editors write one); the training reader accepts it too.
        decoded = raw.decode("utf-8-sig" if line == 1 else "utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}:{line}: not valid UTF-8 ({e}); re-encode the file as UTF-8") from None
    decoded = decoded.rstrip("\r\n")
    if fmt == "text":
        return Record(line, None, instruction, decoded)
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        raise CorpusError(f"{path}:{line}: malformed JSON ({e})") from None
    if not isinstance(obj, dict):
        raise CorpusError(f"{path}:{line}: expected a JSON object with 'text', got {type(obj).__name__}")
    text = obj.get("text")
    if not isinstance(text, str):
        raise CorpusError(f"{path}:{line}: 'text' is missing or not a string")
    line_instruction = obj.get("instruction", instruction)
    if line_instruction is None:
        raise CorpusError(f"{path}:{line}: no instruction; give each line an \"instruction\" or pass "
                          "--instruction for all (an empty string means no instruction)")
    if not isinstance(line_instruction, str):
        raise CorpusError(f"{path}:{line}: 'instruction' is not a string")
    for what, value in (("text", text), ("instruction", line_instruction)):
        problem = lone_surrogate(value)
        if problem:
            raise CorpusError(f"{path}:{line}: the {what} {problem}")
    record_id = obj.get("id")
    if record_id is not None and not isinstance(record_id, str):
        # As JSON (true, [1, 2], {"k": 1}; 7 and 1.5 as before), not as Python's repr (True, {'k': 1}).
        record_id = json.dumps(record_id, ensure_ascii=False)
    if check_ids and record_id is not None and LINE_BREAKS.intersection(record_id):
        raise CorpusError(f"{path}:{line}: the id {record_id[:40]!r} contains a line break; the ids file holds "
                          "one id per line, so ids must not")
    return Record(line, record_id, line_instruction, text)


def open_input(path):
    """The input file, binary: a local path, or a URL read through etils.epath (seekable)."""
    with fileio.explain_url_errors(path, "read"):
        return fileio.as_path(path).open("rb")


def input_stat(path) -> tuple[int, float]:
    """(size in bytes, modification time) of a local file or a URL's object."""
    if fileio.is_url(path):
        with fileio.explain_url_errors(path, "read"):
            stat = fileio.as_path(path).stat()
        return int(stat.length), float(getattr(stat, "mtime", 0) or 0)
    stat = pathlib.Path(path).stat()
    return stat.st_size, stat.st_mtime


def check_format(fmt: str, instruction: Optional[str]) -> None:
    """Refuses a format this module cannot read, and plain text without the instruction it needs."""
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"input format must be 'jsonl' or 'text', got {fmt!r}")
    if fmt == "text" and instruction is None:
        raise CorpusError("plain-text input needs --instruction (an empty string means no instruction)")


def default_format(path) -> str:
    """The input format a path implies when none is given: .jsonl / .json are JSONL, anything else text."""
    return "jsonl" if pathlib.PurePosixPath(str(path)).suffix in (".jsonl", ".json") else "text"


def is_input_file(path) -> bool:
    if fileio.is_url(path):
        with fileio.explain_url_errors(path, "read"):
            target = fileio.as_path(path)
            return target.exists() and not target.is_dir()
    return pathlib.Path(path).is_file()


def raw_lines(f, byte_range: Optional[tuple[int, int]] = None) -> Iterator[bytes]:
    """The lines (b"\n" ends one, as Python's binary line iteration splits) of an open binary file, or of
    its byte range [start, end), which must begin at a line start; a line running past `end` is not in it
    (the range ends at a line start too: see corpus_shards)."""
    if byte_range is None:
        yield from f
        return
    start, end = byte_range
    f.seek(start)
    position = start
    for raw in f:
        if position >= end:
            return
        position += len(raw)
        yield raw


def read_records(path, fmt: str, instruction: Optional[str] = None, skip_bad_lines: bool = False,
                 start_line: int = 0, check_ids: bool = False, byte_range: Optional[tuple[int, int]] = None,
                 first_line: int = 1) -> Iterator[Record]:
    """Records from line `start_line + 1` on. Blank JSONL lines are skipped; a bad line raises, or with
    `skip_bad_lines` comes back as a Record with `error` set. `check_ids` makes an id with a line break
    a bad line. `byte_range` reads only that part of the file, whose first line is line `first_line`."""
    check_format(fmt, instruction)
    with open_input(path) as f:
        for line, raw in enumerate(raw_lines(f, byte_range), start=first_line):
            if line <= start_line:
                continue
            if fmt == "jsonl" and not raw.strip():
                continue
            try:
                yield _parse_line(raw, line, str(path), fmt, instruction, check_ids)
            except CorpusError as e:
                if not skip_bad_lines:
                    raise
                yield Record(line, None, None, None, error=str(e))


def count_lines(path, fmt: str, byte_range: Optional[tuple[int, int]] = None) -> tuple[int, int]:
    """(lines, texts) of the file or of its byte range: texts are the lines that become a record (or a
    skipped bad line): every line of a text file, JSONL's non-blank ones."""
    lines = texts = 0
    with open_input(path) as f:
        for raw in raw_lines(f, byte_range):
            lines += 1
            texts += fmt == "text" or bool(raw.strip())
    return lines, texts


def count_texts(path, fmt: str) -> int:
    """Lines that become a record (or a skipped bad line): every line of a text file, JSONL's non-blank ones."""
    return count_lines(path, fmt)[1]


@dataclasses.dataclass
class Progress:
    """What `OUT.partial.json` records: enough to check a resume is the same run, and where it stopped."""

    input: str
    input_size: int
    input_mtime: float
    settings: dict
    lines_done: int = 0
    rows_done: int = 0
    skipped: int = 0
    truncated: int = 0
    weights: dict = dataclasses.field(default_factory=dict)  # fingerprint.signature of the model

    def differences(self, other: "Progress") -> list[str]:
        """What makes `other` (this run) a different run from this one (the saved), in words; weights aside."""
        found = [f"the input ({name} {getattr(self, key)!r} -> {getattr(other, key)!r})"
                 for key, name in (("input", "path"), ("input_size", "size"), ("input_mtime", "mtime"))
                 if getattr(self, key) != getattr(other, key)]
        for key in sorted(set(self.settings) | set(other.settings)):
            old, new = self.settings.get(key, "(absent)"), other.settings.get(key, "(absent)")
            if key == "model" and old != new and same_file(old, new):
                continue  # one model directory, spelt two ways (its weights' contents are compared apart)
            if old != new:
                found.append(f"{key} ({old!r} -> {new!r})")
        return found


def _save_progress(path: pathlib.Path, progress: Progress) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(progress)))
    os.replace(tmp, path)


def same_file(a, b) -> bool:
    """Whether two paths (or URLs) name one file: the same resolved path, or (for local files that exist)
    the same inode, so that a symlink or hard link to a file is that file."""
    if fileio.is_url(a) or fileio.is_url(b):
        return str(a).rstrip("/") == str(b).rstrip("/")
    a, b = pathlib.Path(a), pathlib.Path(b)
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return False


def check_outputs(output_path, ids_path=None, overwrite: bool = False, resume: bool = False,
                  input_path=None, input_flag: str = "--input") -> None:
    """Refuses, before any model is loaded, an output that cannot be written or would be lost (the input,
    given by `input_flag`, among them, --overwrite or not). Outputs may be URLs (then both must be)."""
    if ids_path is not None and fileio.is_url(ids_path) != fileio.is_url(output_path):
        raise ValueError(f"--output {output_path} and --ids {ids_path} must both be local paths or both URLs")
    for target, flag in ((output_path, "--output"), (ids_path, "--ids")):
        if target is None:
            continue
        if input_path is not None and same_file(target, input_path):
            raise ValueError(f"{flag} {target} is the input file ({input_flag} {input_path}): writing it would destroy "
                             f"the input; give {flag} another file")
        example = ("embeddings.npy" if flag == "--output" else "ids.txt")
        if fileio.is_url(target):
            with fileio.explain_url_errors(target, "write"):
                remote = fileio.as_path(target)
                is_dir, exists = remote.is_dir(), remote.exists()
            if is_dir:
                raise IsADirectoryError(f"{flag} {target} is a directory; give the file to write, such as "
                                        f"{str(target).rstrip('/')}/{example}")
            if exists and not overwrite:
                raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
            continue
        target = pathlib.Path(target)
        if target.is_dir():
            raise IsADirectoryError(f"{flag} {target} is a directory; give the file to write, "
                                    f"such as {target / example}")
        if target.exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
        if target.parent.exists() and not target.parent.is_dir():
            raise NotADirectoryError(f"{flag} {target}: {target.parent} is a file, not a directory")
    if ids_path is not None and same_file(ids_path, output_path):
        raise ValueError("--ids and --output name the same file")


def check_buckets(buckets, max_seq_length: int) -> tuple[int, ...]:
    """Sorted positive buckets whose largest holds max_seq_length: else the first long input fails mid-run."""
    buckets = check_bucket_values(buckets)
    if buckets[-1] < max_seq_length:
        raise ValueError(f"the largest bucket ({buckets[-1]}) must be at least the model's max_seq_length "
                         f"({max_seq_length}), which an input may reach; add {max_seq_length} to --buckets")
    return buckets


def _tokenize_chunk(model, chunk: list[Record]):
    good = [r for r in chunk if r.error is None]
    tokenized = model.tokenizer.tokenize([[r.instruction, r.text] for r in good], warn_truncation=False)
    return chunk[-1].line, good, len(chunk) - len(good), tokenized


def run_settings(model, buckets, *, dtype, packing, normalize, instruction, fmt, ids: bool, store: str,
                 share=None) -> dict:
    """Everything that decides the numbers written, so that a resume never mixes two runs' rows. Keys added
    since the first release are present only when not at their default, so that older partial files (which
    lack them) still resume."""
    config = model.config
    settings = {
        "model": str(model.source), "dim": model.dim, "dtype": dtype or config.encoder.dtype,
        "model_dtype": config.encoder.param_dtype, "pooling_rule": config.pooling_rule,
        "max_seq_length": config.max_seq_length, "do_lower_case": config.do_lower_case,
        "buckets": list(buckets), "packing": {None: "auto", True: "on", False: "off"}[packing],
        "normalize": normalize, "instruction": instruction, "format": fmt, "ids": ids}
    if store != "float32":
        settings["store_dtype"] = store
    if share is not None:
        settings["share"] = share.settings()
    return settings


def new_progress(input_path, settings: dict) -> Progress:
    size, mtime = input_stat(input_path)
    where = str(input_path) if fileio.is_url(input_path) else str(pathlib.Path(input_path).resolve())
    return Progress(where, size, mtime, settings=settings)


def encode_corpus(model, input_path, output_path, instruction: Optional[str] = None, fmt: Optional[str] = None,
                  ids_path=None, batch_size: int = 64, chunk_size: int = 8192, dtype: Optional[str] = None,
                  normalize: bool = True, skip_bad_lines: bool = False, resume: bool = False,
                  overwrite: bool = False, show_progress_bar: bool = True, packing: Optional[bool] = None,
                  store_dtype: str = "float32", share=None) -> Progress:
    """Encodes every record of `input_path` into `output_path` (.npy); returns the final Progress.

    `packing` is `Instructor.encode`'s: None packs several inputs per row where that computes less.
    `store_dtype` is the dtype of the rows written (float32, float16 or bfloat16). `share` (a
    corpus_shards.Share) encodes only that byte range of the input, numbering its lines from the share's
    global first line, and leaves a completion sidecar (`completion_path`) beside the finished output.

    An interrupted run (Ctrl-C included) leaves OUT.partial and OUT.partial.json for `resume=True`. A URL
    output is written in a local staging directory (where its partial files stay, for a resume on the same
    host) and uploaded when complete.
    """
    input_name = str(input_path)
    input_path = input_name if fileio.is_url(input_name) else pathlib.Path(input_name)
    fmt = fmt or default_format(input_name)
    check_format(fmt, instruction)  # before anything is written (read_records would say it after)
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r} (T5 overflows in float16)")
    storage_dtype(store_dtype)  # checks the name
    if not is_input_file(input_path):
        raise FileNotFoundError(f"{input_path} does not exist")
    check_outputs(output_path, ids_path, overwrite, resume, input_path=input_path)
    buckets = check_buckets(model.buckets, model.config.max_seq_length)
    settings = run_settings(model, buckets, dtype=dtype, packing=packing, normalize=normalize,
                            instruction=instruction, fmt=fmt, ids=ids_path is not None, store=store_dtype,
                            share=share)
    remote = fileio.is_url(output_path)
    if remote:
        remote_output, remote_ids = str(output_path), None if ids_path is None else str(ids_path)
        output_path = staging_path(remote_output)
        ids_path = None if ids_path is None else output_path.with_name(
            "ids-" + pathlib.PurePosixPath(remote_ids).name)
        overwrite = True  # the URL was checked above; a staged copy left from an upload that failed is ours
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with locks.held(output_path.with_name(output_path.name + ".lock"), f"the output {output_path}"):
        progress = _encode_locked(model, input_path, output_path, instruction, fmt, ids_path, batch_size,
                                  chunk_size, dtype, normalize, skip_bad_lines, resume, overwrite,
                                  show_progress_bar, buckets, packing, store_dtype, share, settings)
    if remote:
        upload(output_path, remote_output, ids_path, remote_ids, share is not None)
    return progress


def staging_path(output_url: str) -> pathlib.Path:
    """Where the output at a URL is written (with its partial files) before it is uploaded: a directory
    named after the URL, the same on every run on this host, so that a resume finds its partial files."""
    return fileio.RemoteMirror.staging_dir(f"encode:{output_url}") / pathlib.PurePosixPath(output_url).name


def upload(output_path: pathlib.Path, remote_output: str, ids_path, remote_ids, sidecar: bool) -> None:
    """Uploads a finished staged output (ids first, the sidecar last: what is on the bucket is complete as
    far as it goes), then removes the staged copies."""
    pairs = [(ids_path, remote_ids), (output_path, remote_output)]
    if sidecar:
        pairs.append((pathlib.Path(completion_path(output_path)), completion_path(remote_output)))
    for local, target in pairs:
        if local is not None:
            copy_file(local, target)
    for local, _ in pairs:
        if local is not None:
            pathlib.Path(local).unlink()


def _encode_locked(model, input_path, output_path, instruction, fmt, ids_path, batch_size, chunk_size, dtype,
                   normalize, skip_bad_lines, resume, overwrite, show_progress_bar, buckets, packing, store,
                   share, settings) -> Progress:
    # Checked again under the lock: another run may have finished this output meanwhile.
    check_outputs(output_path, ids_path, overwrite, resume, input_path=input_path)
    partial = output_path.with_name(output_path.name + ".partial")
    state_path = output_path.with_name(output_path.name + ".partial.json")
    ids_partial = None if ids_path is None else pathlib.Path(str(ids_path) + ".partial")

    dim = model.dim
    row_bytes = dim * storage_dtype(store).itemsize
    progress = new_progress(input_path, settings)
    if resume and state_path.exists() and partial.exists():
        saved = Progress(**json.loads(state_path.read_text()))
        differences = saved.differences(progress)
        if not fingerprint.same_weights(saved.weights, model):
            differences.insert(0, "the model's weights (their contents changed)")
        if differences:
            raise ValueError(f"{state_path} belongs to a different run: {'; '.join(differences)}. Resume with "
                             "what made it, or run without --resume to start over")
        progress = saved
        log.warning("resuming at line %d (%d embeddings already written)", progress.lines_done, progress.rows_done)
    else:
        if partial.exists():
            log.warning("%s is left from an interrupted run; starting over (pass --resume to continue it)", partial)
        progress.weights = fingerprint.signature(model)

    data = open(partial, "r+b" if progress.rows_done else "wb")
    ids_file = None if ids_partial is None else open(ids_partial, "r+b" if progress.rows_done else "wb")
    # Drop whatever an interrupted chunk wrote after the last recorded one.
    data.truncate(NPY_HEADER_BYTES + progress.rows_done * row_bytes)
    data.seek(0, os.SEEK_END)
    if data.tell() < NPY_HEADER_BYTES:
        data.write(b"\0" * NPY_HEADER_BYTES)
    if ids_file is not None:
        for _ in range(progress.rows_done):
            ids_file.readline()
        ids_file.truncate(ids_file.tell())
    _save_progress(state_path, progress)  # from here on the partial files are resumable

    byte_range = None if share is None else (share.start, share.end)
    records = read_records(input_path, fmt, instruction, skip_bad_lines, start_line=progress.lines_done,
                           check_ids=ids_path is not None, byte_range=byte_range,
                           first_line=1 if share is None else share.first_line)

    def tokenized_chunks():
        """(last line, good records, bad-line count, tokenized) per chunk of `chunk_size` lines read."""
        chunk = []
        for record in records:
            chunk.append(record)
            if len(chunk) == chunk_size:
                yield _tokenize_chunk(model, chunk)
                chunk = []
        if chunk:
            yield _tokenize_chunk(model, chunk)

    # A share knows its count already (corpus_shards counted it to number the lines).
    total_texts = count_texts(input_path, fmt) if share is None else share.texts
    # By texts, batch by batch (a chunk can take minutes): tqdm adds the rate and the time left.
    bar = tqdm(total=total_texts, initial=progress.rows_done + progress.skipped, disable=not show_progress_bar,
               desc="encoding" if share is None else f"encoding {share.index + 1}/{share.count}", unit="text",
               dynamic_ncols=True)
    target_dtype = storage_dtype(store)
    try:
        for last_line, chunk, bad, tokenized in prefetch(tokenized_chunks(), size=1):
            embeddings = model.batch_encoder.encode(tokenized, batch_size, buckets, normalize=normalize, dtype=dtype,
                                                    on_batch=bar.update, packing_mode=packing)
            data.write(embeddings.astype(target_dtype).tobytes())
            data.flush()
            os.fsync(data.fileno())
            if ids_file is not None:
                ids_file.write("".join(f"{r.id if r.id is not None else r.line}\n" for r in chunk).encode())
                ids_file.flush()
                os.fsync(ids_file.fileno())
            progress.rows_done += len(chunk)
            progress.truncated += tokenized.num_truncated
            progress.skipped += bad
            progress.lines_done = last_line
            _save_progress(state_path, progress)
            bar.update(bad)
        write_npy_header(data, progress.rows_done, dim, store)
        data.flush()
        os.fsync(data.fileno())
    finally:
        bar.close()
        data.close()
        if ids_file is not None:
            ids_file.close()
    if share is not None:
        # Before the renames: a finished shard always has its sidecar (one without is not finished).
        write_text_atomically(completion_path(output_path), json.dumps(dataclasses.asdict(progress)) + "\n")
    os.replace(partial, output_path)
    if ids_partial is not None:
        os.replace(ids_partial, ids_path)
    state_path.unlink()
    what = input_path if share is None else f"{input_path} (share {share.index + 1} of {share.count})"
    if not progress.rows_done and not progress.skipped:
        log.warning("%s holds no texts to encode; wrote an empty [0, %d] array to %s", what, dim, output_path)
    if progress.truncated:
        log.warning("%d of %d inputs were longer than max_seq_length=%d tokens and were truncated",
                    progress.truncated, progress.rows_done, model.config.max_seq_length)
    if progress.skipped:
        log.warning("skipped %d bad line(s) of %s", progress.skipped, what)
    return progress
