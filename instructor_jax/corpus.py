"""Encoding a corpus file into a .npy, streamed in chunks, resumable, never leaving a file that looks done.

Input: JSONL (`{"instruction": ..., "text": ..., "id": ...}` per line; `--instruction` fills in for lines
without one) or plain text (one text per line, with `--instruction`). Output: OUT.npy float32 [n, dim]
in input order, and optionally the ids, one per line.

While running, rows go to `OUT.partial` (a .npy whose header is written last) and progress to
`OUT.partial.json` after every chunk, each chunk flushed to disk first. An interrupted run leaves only
those; `--resume` continues from them; success renames `OUT.partial` to OUT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Iterator, Optional

from tqdm.auto import tqdm

from instructor_jax.encoding import prefetch

log = logging.getLogger(__name__)

NPY_HEADER_BYTES = 128  # reserved at the start of the partial file; a multiple of 64 as .npy wants


class CorpusError(ValueError):
    """A corpus line cannot be read; the message gives the file and line number."""


@dataclasses.dataclass
class Record:
    line: int  # 1-based line number in the input
    id: Optional[str]
    instruction: Optional[str]
    text: Optional[str]
    error: Optional[str] = None  # set for a bad line read with skip_bad_lines


def _parse_line(raw: bytes, line: int, path: str, fmt: str, instruction: Optional[str]) -> Record:
    try:
        decoded = raw.decode("utf-8")
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
    record_id = obj.get("id")
    return Record(line, None if record_id is None else str(record_id), line_instruction, text)


def read_records(path, fmt: str, instruction: Optional[str] = None, skip_bad_lines: bool = False,
                 start_line: int = 0) -> Iterator[Record]:
    """Records from line `start_line + 1` on. Blank JSONL lines are skipped; a bad line raises, or with
    `skip_bad_lines` comes back as a Record with `error` set."""
    if fmt == "text" and instruction is None:
        raise CorpusError("plain-text input needs --instruction (an empty string means no instruction)")
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            if line <= start_line:
                continue
            if fmt == "jsonl" and not raw.strip():
                continue
            try:
                yield _parse_line(raw, line, str(path), fmt, instruction)
            except CorpusError as e:
                if not skip_bad_lines:
                    raise
                yield Record(line, None, None, None, error=str(e))


def count_lines(path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def write_npy_header(f, rows: int, dim: int) -> None:
    """A .npy v1.0 header for float32 [rows, dim], padded to exactly NPY_HEADER_BYTES."""
    header = repr({"descr": "<f4", "fortran_order": False, "shape": (rows, dim)}).encode("latin1")
    header_len = NPY_HEADER_BYTES - 10
    header = header.ljust(header_len - 1) + b"\n"
    if len(header) != header_len:
        raise ValueError(f"shape ({rows}, {dim}) does not fit the reserved .npy header")
    f.seek(0)
    f.write(b"\x93NUMPY\x01\x00" + header_len.to_bytes(2, "little") + header)


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

    def same_run(self, other: "Progress") -> bool:
        return (self.input, self.input_size, self.input_mtime, self.settings) == \
               (other.input, other.input_size, other.input_mtime, other.settings)


def _save_progress(path: pathlib.Path, progress: Progress) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dataclasses.asdict(progress)))
    os.replace(tmp, path)


def _tokenize_chunk(model, chunk: list[Record]):
    good = [r for r in chunk if r.error is None]
    tokenized = model.tokenizer.tokenize([[r.instruction, r.text] for r in good], warn_truncation=False)
    return chunk[-1].line, good, len(chunk) - len(good), tokenized


def encode_corpus(model, input_path, output_path, instruction: Optional[str] = None, fmt: Optional[str] = None,
                  ids_path=None, batch_size: int = 64, chunk_size: int = 8192, dtype: Optional[str] = None,
                  normalize: bool = True, skip_bad_lines: bool = False, resume: bool = False,
                  overwrite: bool = False, show_progress_bar: bool = True) -> Progress:
    """Encodes every record of `input_path` into `output_path` (.npy); returns the final Progress."""
    input_path, output_path = pathlib.Path(input_path), pathlib.Path(output_path)
    fmt = fmt or ("jsonl" if input_path.suffix in (".jsonl", ".json") else "text")
    if fmt not in ("jsonl", "text"):
        raise ValueError(f"input format must be 'jsonl' or 'text', got {fmt!r}")
    if not input_path.is_file():
        raise FileNotFoundError(f"{input_path} does not exist")
    for target in (output_path, ids_path):
        if target is not None and pathlib.Path(target).exists() and not overwrite:
            raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial")
    state_path = output_path.with_name(output_path.name + ".partial.json")
    ids_partial = None if ids_path is None else pathlib.Path(str(ids_path) + ".partial")

    dim = model.dim
    stat = input_path.stat()
    progress = Progress(str(input_path.resolve()), stat.st_size, stat.st_mtime, settings={
        "model": str(model.source), "dim": dim, "dtype": dtype or model.config.encoder.dtype,
        "normalize": normalize, "instruction": instruction, "format": fmt, "ids": ids_path is not None})
    if resume and state_path.exists() and partial.exists():
        saved = Progress(**json.loads(state_path.read_text()))
        if not saved.same_run(progress):
            raise ValueError(f"{state_path} belongs to a different run (other input, model or settings); "
                             "run without --resume to start over")
        progress = saved
        log.warning("resuming at line %d (%d embeddings already written)", progress.lines_done, progress.rows_done)
    elif partial.exists() and not resume:
        log.warning("%s is left from an interrupted run; starting over (pass --resume to continue it)", partial)

    data = open(partial, "r+b" if progress.rows_done else "wb")
    ids_file = None if ids_partial is None else open(ids_partial, "r+b" if progress.rows_done else "wb")
    # Drop whatever an interrupted chunk wrote after the last recorded one.
    data.truncate(NPY_HEADER_BYTES + progress.rows_done * dim * 4)
    data.seek(0, os.SEEK_END)
    if data.tell() < NPY_HEADER_BYTES:
        data.write(b"\0" * NPY_HEADER_BYTES)
    if ids_file is not None:
        for _ in range(progress.rows_done):
            ids_file.readline()
        ids_file.truncate(ids_file.tell())

    records = read_records(input_path, fmt, instruction, skip_bad_lines, start_line=progress.lines_done)

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

    total_lines = count_lines(input_path)
    bar = tqdm(total=total_lines, initial=progress.lines_done, disable=not show_progress_bar,
               desc="encoding", unit="line", dynamic_ncols=True)
    try:
        last_line = progress.lines_done
        for last_line, chunk, bad, tokenized in prefetch(tokenized_chunks(), size=1):
            embeddings = model.batch_encoder.encode(tokenized, batch_size,
                                                    model.buckets, normalize=normalize, dtype=dtype)
            data.write(embeddings.tobytes())
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
            bar.update(progress.lines_done - last_line)
            last_line = progress.lines_done
        progress.lines_done = total_lines
        bar.update(total_lines - last_line)
        write_npy_header(data, progress.rows_done, dim)
        data.flush()
        os.fsync(data.fileno())
    finally:
        bar.close()
        data.close()
        if ids_file is not None:
            ids_file.close()
    os.replace(partial, output_path)
    if ids_partial is not None:
        os.replace(ids_partial, ids_path)
    state_path.unlink()
    if progress.truncated:
        log.warning("%d of %d inputs were longer than max_seq_length=%d tokens and were truncated",
                    progress.truncated, progress.rows_done, model.config.max_seq_length)
    if progress.skipped:
        log.warning("skipped %d bad line(s) of %s", progress.skipped, input_path)
    return progress
