"""Embeddings on disk: the .npy rows `instructor-jax encode` writes, the manifest of a multi-process run's
shards, one memory-mapped view over either (`open_embeddings`), and merging shards into one file.

Storage dtypes: float32 (the default), float16, or bfloat16. Unit-norm embeddings lose little in 16 bits (a
cosine changes by ~1e-3 at most) and the disk and network cost halves. A bfloat16 .npy is numpy's own
layout for ml_dtypes' bfloat16 (descr `<V2`, since numpy has no bfloat16 of its own):
`np.load(f).view(ml_dtypes.bfloat16)` reads it, and `open_embeddings` does so itself.

A manifest (`OUT.manifest.json` for `--output OUT.npy`) lists the shards in input order, each with its row
count and the input lines and bytes it covers, with the model/settings fingerprint and the storage dtype.
Shard paths in it are relative to the manifest's directory where they can be, so a finished set can be
moved or copied as a whole (to or from a gs:// bucket too).
"""

from __future__ import annotations

import glob
import json
import os
import pathlib
import posixpath
import re
import shutil
from typing import Optional, Sequence

import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from instructor_jax.runtime import fileio

NPY_HEADER_BYTES = 128  # reserved at the start of a partial file; a multiple of 64 as .npy wants
NPY_MAGIC = b"\x93NUMPY"
MANIFEST_FORMAT = "instructor-jax sharded embeddings"
MANIFEST_VERSION = 1
STORE_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
                "bfloat16": np.dtype(ml_dtypes.bfloat16)}
COPY_BLOCK = 64 << 20  # bytes per read when streaming a shard (never a whole shard in memory)


def store_dtype(name: str) -> np.dtype:
    if name not in STORE_DTYPES:
        raise ValueError(f"the storage dtype must be one of {', '.join(STORE_DTYPES)}, got {name!r}")
    return STORE_DTYPES[name]


def store_dtype_name(dtype) -> str:
    """The STORE_DTYPES name of a numpy dtype (a bfloat16 .npy loads as 2-byte void: that is bfloat16)."""
    dtype = np.dtype(dtype)
    if dtype.kind == "V" and dtype.itemsize == 2:
        return "bfloat16"
    for name, known in STORE_DTYPES.items():
        if known == dtype:
            return name
    raise ValueError(f"{dtype} is not an embeddings storage dtype ({', '.join(STORE_DTYPES)})")


def write_npy_header(f, rows: int, dim: int, dtype: str = "float32") -> None:
    """A .npy v1.0 header for [rows, dim] of a storage dtype, padded to exactly NPY_HEADER_BYTES.

    The rows follow it: the file is written rows first (the header space zeroed), header last, so a file
    cut short never claims rows it lacks."""
    header = repr({"descr": store_dtype(dtype).str, "fortran_order": False, "shape": (rows, dim)}).encode("latin1")
    header_len = NPY_HEADER_BYTES - 10
    header = header.ljust(header_len - 1) + b"\n"
    if len(header) != header_len:
        raise ValueError(f"shape ({rows}, {dim}) does not fit the reserved .npy header")
    f.seek(0)
    f.write(NPY_MAGIC + b"\x01\x00" + header_len.to_bytes(2, "little") + header)


def _stem(path) -> str:
    path = str(path)
    return path[:-len(".npy")] if path.endswith(".npy") else path


def manifest_path(output) -> str:
    """Where a multi-process run with `--output OUTPUT` writes its manifest: emb.npy -> emb.manifest.json."""
    return _stem(output) + ".manifest.json"


def _split_name(name: str) -> tuple[str, str]:
    """(stem, suffix with its dot): "emb.npy" -> ("emb", ".npy"); "ids" -> ("ids", ""); ".x" -> (".x", "")."""
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem.strip("."):
        return name, ""
    return stem, dot + suffix


def shard_path(path, index: int, count: int) -> str:
    """OUTPUT (or the ids file) of process `index` of `count`: emb.npy -> emb-00001-of-00004.npy."""
    directory, name = posixpath.split(str(path)) if fileio.is_url(path) else os.path.split(str(path))
    stem, suffix = _split_name(name)
    shard = f"{stem}-{index:05d}-of-{count:05d}{suffix}"
    return f"{directory}/{shard}" if fileio.is_url(path) else os.path.join(directory, shard)


def shard_glob(path) -> tuple[str, str]:
    """(directory, glob pattern) matching every shard file of `path` of any count, with the partial and
    lock files beside them: emb.npy -> emb-*-of-*.npy*."""
    directory, name = posixpath.split(str(path)) if fileio.is_url(path) else os.path.split(str(path))
    stem, suffix = _split_name(name)
    return directory or ".", f"{glob.escape(stem)}-*-of-*{glob.escape(suffix)}*"


def parse_shard_name(path, name: str) -> Optional[tuple[int, int]]:
    """(index, count) if `name` is one of `path`'s shard files (or their partial/lock files), else None."""
    stem, suffix = _split_name(os.path.basename(str(path)))
    found = re.fullmatch(re.escape(stem) + r"-(\d{5})-of-(\d{5})" + re.escape(suffix) + r"(\..*)?", name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def relative_to(path, base_dir) -> str:
    """`path` as the manifest records it: relative to the manifest's directory if both are local or both
    lie under the same URL scheme and bucket, else as given (then the set cannot be moved whole)."""
    path, base_dir = str(path), str(base_dir)
    if fileio.is_url(path) != fileio.is_url(base_dir):
        return path
    if fileio.is_url(path):
        scheme, _, rest = path.partition("://")
        base_scheme, _, base_rest = base_dir.partition("://")
        bucket, base_bucket = rest.split("/", 1)[0], base_rest.split("/", 1)[0]
        if (scheme, bucket) != (base_scheme, base_bucket):
            return path
        return posixpath.relpath("/" + rest, "/" + base_rest)
    return os.path.relpath(os.path.abspath(path), os.path.abspath(base_dir))


def _resolve(entry: str, base_dir: str) -> str:
    if fileio.is_url(entry) or os.path.isabs(entry):
        return entry
    if fileio.is_url(base_dir):
        scheme, _, rest = base_dir.partition("://")
        return f"{scheme}://" + posixpath.normpath(posixpath.join(rest, entry))
    return os.path.normpath(os.path.join(base_dir, entry))


def parent_directory(path) -> str:
    """The directory a local path or URL lies in (absolute, for a local path)."""
    path = str(path)
    if fileio.is_url(path):
        return path.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(path))


class DamagedFile(ValueError):
    """An embeddings file that cannot be read as one: cut short, or its header overwritten."""


def load_npy(path, mmap: bool = True) -> np.ndarray:
    """An embeddings .npy (memory-mapped), bfloat16 ones viewed as bfloat16. One that numpy cannot read
    is a DamagedFile naming it."""
    try:
        array = np.load(path, mmap_mode="r" if mmap else None)
    except (ValueError, EOFError) as e:  # "mmap length is greater than file size", a header cut short, ...
        raise DamagedFile(f"{path} is damaged or cut short ({e})") from None
    if array.ndim != 2:
        raise ValueError(f"{path} holds an array of shape {array.shape}, not embeddings [rows, dim]")
    if array.dtype.kind == "V" and array.dtype.itemsize == 2:
        array = array.view(ml_dtypes.bfloat16)
    return array


def read_ids(path) -> list[str]:
    """An ids file, one id per line (ids never hold line breaks: the encoder refuses those)."""
    with fileio.as_path(path).open("rb") as f:
        return [line.decode("utf-8").rstrip("\n") for line in f]


def write_text_atomically(path, text: str) -> None:
    """A temporary name, then a rename; a URL's upload replaces its object whole, so it needs neither."""
    if fileio.is_url(path):
        with fileio.explain_url_errors(path, "write"):
            fileio.as_path(path).parent.mkdir(parents=True, exist_ok=True)
            fileio.as_path(path).write_text(text)
        return
    tmp = pathlib.Path(str(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(path, manifest: dict) -> None:
    write_text_atomically(path, json.dumps(manifest, indent=1) + "\n")


def read_manifest(path) -> dict:
    with fileio.explain_url_errors(path, "read"):
        text = fileio.as_path(path).read_bytes()
    try:
        manifest = json.loads(text.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is neither an embeddings .npy nor a manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an instructor-jax embeddings manifest (its 'format' is not "
                         f"{MANIFEST_FORMAT!r})")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > MANIFEST_VERSION:
        raise ValueError(f"{path} is a version {manifest.get('version')} manifest; this instructor-jax reads up "
                         f"to version {MANIFEST_VERSION}: upgrade it")
    if not isinstance(manifest.get("shards"), list):
        raise ValueError(f"{path} lists no shards")
    return manifest


def _is_npy(path) -> bool:
    with fileio.as_path(path).open("rb") as f:
        return f.read(len(NPY_MAGIC)) == NPY_MAGIC


def _local_copy(url: str) -> pathlib.Path:
    """A URL's file in a local cache directory (downloaded once, streamed), for memory-mapping. Fetched
    again when the remote object's size or modification time changes."""
    # A cache of its own, apart from the staging directory that an encode to this URL writes in.
    target = fileio.RemoteMirror.staging_dir("read-cache:" + url) / posixpath.basename(url)
    stat = fileio.as_path(url).stat()
    size, mtime = stat.length, float(getattr(stat, "mtime", 0) or 0)
    fresh = target.is_file() and target.stat().st_size == size and abs(target.stat().st_mtime - mtime) < 1e-3
    if not fresh:
        target.parent.mkdir(parents=True, exist_ok=True)
        copy_file(url, target)
        if mtime:
            os.utime(target, (mtime, mtime))
    return target


def copy_file(source, target) -> None:
    """Streams one file to another; either may be a URL. A local target appears only when complete (a
    URL's object is replaced whole by its upload)."""
    local_target = not fileio.is_url(target)
    tmp = pathlib.Path(str(target) + ".tmp") if local_target else target
    with fileio.explain_url_errors(source if fileio.is_url(source) else target, "copy to or from"):
        if not local_target:
            fileio.as_path(target).parent.mkdir(parents=True, exist_ok=True)  # a no-op on a bucket
        with fileio.as_path(source).open("rb") as src, fileio.as_path(tmp).open("wb") as dst:
            shutil.copyfileobj(src, dst, COPY_BLOCK)
    if local_target:
        os.replace(tmp, target)


class Embeddings:
    """Read-only rows in input order over one or more memory-mapped .npy parts, with their ids.

    Indexing (an int, a slice, an integer or boolean array, optionally with a column index) gives a numpy
    array, reading only the rows asked for; `np.asarray(view)` reads all of them.
    """

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray], ids_files: Sequence[Optional[str]] = (),
                 manifest: Optional[dict] = None, files: Sequence[str] = ()):
        dims = {p.shape[1] for p in parts}
        if len(dims) > 1:
            raise ValueError(f"the shards have different widths {sorted(dims)}")
        dtypes = {np.dtype(p.dtype) for p in parts}
        if len(dtypes) > 1:
            raise ValueError(f"the shards have different dtypes {sorted(map(str, dtypes))}")
        self.parts = list(parts)
        self.manifest = manifest
        self.files = [str(f) for f in files]  # where the parts were read from
        self._ids_files = list(ids_files)
        self._ids: Optional[list[str]] = None
        self._offsets = np.cumsum([0] + [len(p) for p in self.parts])
        self.dtype = dtypes.pop() if dtypes else np.dtype(np.float32)
        self.shape = (int(self._offsets[-1]), dims.pop() if dims else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"Embeddings(shape={self.shape}, dtype={self.dtype}, parts={len(self.parts)})"

    @property
    def has_ids(self) -> bool:
        """Whether every part has an ids file (without reading them)."""
        return bool(self._ids_files) and all(self._ids_files)

    @property
    def ids(self) -> Optional[list[str]]:
        """Each row's id (the input's 'id', else its line number), or None when the run wrote no ids."""
        if self._ids is None and self.has_ids:
            ids = [i for path in self._ids_files for i in read_ids(path)]
            if len(ids) != len(self):
                raise ValueError(f"the ids files hold {len(ids)} ids for {len(self)} rows; the ids and the "
                                 "embeddings come from different runs")
            self._ids = ids
        return self._ids

    def __array__(self, dtype=None, copy=None):
        whole = self[:]
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key):
        if isinstance(key, tuple):
            if len(key) != 2:
                raise IndexError("embeddings are 2-D: index them with [rows] or [rows, columns]")
            rows, columns = key
        else:
            rows, columns = key, slice(None)
        if isinstance(rows, (int, np.integer)):
            index = int(rows) + len(self) if rows < 0 else int(rows)
            if not 0 <= index < len(self):
                raise IndexError(f"row {rows} is out of range for {len(self)} rows")
            part = int(np.searchsorted(self._offsets, index, side="right")) - 1
            return np.asarray(self.parts[part][index - self._offsets[part]])[columns]
        if isinstance(rows, slice):
            start, stop, step = rows.indices(len(self))
            if step == 1:
                pieces = [p[max(start - lo, 0):max(min(stop, hi) - lo, 0)] for p, lo, hi in
                          zip(self.parts, self._offsets[:-1], self._offsets[1:]) if lo < stop and hi > start]
                return self._join(pieces)[:, columns]
            rows = np.arange(start, stop, step)
        rows = np.asarray(rows)
        if rows.dtype == bool:
            if rows.shape != (len(self),):
                raise IndexError(f"a boolean row mask must have shape ({len(self)},), got {rows.shape}")
            rows = np.nonzero(rows)[0]
        if rows.size and rows.dtype.kind not in "iu":
            raise IndexError(f"rows are indexed by integers, slices or a boolean mask, not {rows.dtype}")
        shape = rows.shape
        flat = rows.reshape(-1).astype(np.int64)
        flat = np.where(flat < 0, flat + len(self), flat)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"a row index is out of range for {len(self)} rows")
        out = np.empty((flat.size, self.shape[1]), self.dtype)
        part_of = np.searchsorted(self._offsets, flat, side="right") - 1
        for part in np.unique(part_of):
            where = part_of == part
            out[where] = self.parts[part][flat[where] - self._offsets[part]]
        return out.reshape(*shape, self.shape[1])[..., columns]

    def _join(self, pieces: list[np.ndarray]) -> np.ndarray:
        if not pieces:
            return np.empty((0, self.shape[1]), self.dtype)
        return np.concatenate([np.asarray(p) for p in pieces])


def open_embeddings(path, ids=None) -> Embeddings:
    """The embeddings at `path`: one .npy, a multi-process run's manifest, or the `--output` of such a run
    (its manifest is then found next to it). `ids` names the ids file of a single .npy (a manifest knows its
    own). Shards are memory-mapped; those at a URL are first downloaded to a local cache directory."""
    path = str(path)
    with fileio.explain_url_errors(path, "read"):
        exists = fileio.as_path(path).exists()
        beside = not exists and fileio.as_path(manifest_path(path)).exists()
    if not (exists or beside):
        raise FileNotFoundError(f"{path} does not exist (nor does a manifest {manifest_path(path)} next to it)")
    path = path if exists else manifest_path(path)
    with fileio.explain_url_errors(path, "read"):
        is_npy = _is_npy(path)
        local = _local_copy(path) if is_npy and fileio.is_url(path) else path
    if is_npy:
        try:
            array = load_npy(local)
        except DamagedFile as e:
            raise DamagedFile(f"{e}: encode it again") from None
        return Embeddings([array], [str(ids)] if ids is not None else [], files=[path])
    manifest = read_manifest(path)
    if ids is not None:
        raise ValueError(f"{path} is a manifest, which names its own ids files; drop ids=")
    base = parent_directory(path)
    parts, ids_files, files = [], [], []
    for shard in manifest["shards"]:
        location = _resolve(shard["embeddings"], base)
        with fileio.explain_url_errors(location, "read"):
            local = _local_copy(location) if fileio.is_url(location) else location
        redo = (f"delete it and its completion file {completion_path(location)}, then rerun the encode with "
                "--resume (that shard alone is encoded again)")
        try:
            part = load_npy(local)
        except DamagedFile as e:
            raise DamagedFile(f"{e}: {redo}") from None
        if part.shape[0] != shard["rows"] or part.shape[1] != manifest["dim"]:
            raise DamagedFile(f"{location} holds {part.shape[0]} rows of dim {part.shape[1]} but {path} records "
                              f"{shard['rows']} of dim {manifest['dim']}; the shard was replaced or cut short: "
                              f"{redo}")
        if store_dtype_name(part.dtype) != manifest["store_dtype"]:
            raise ValueError(f"{location} holds {store_dtype_name(part.dtype)} rows but {path} records "
                             f"{manifest['store_dtype']}")
        parts.append(part)
        files.append(location)
        ids_files.append(_resolve(shard["ids"], base) if shard.get("ids") else None)
    return Embeddings(parts, ids_files, manifest, files)


def completion_path(output_path) -> str:
    """A finished shard's sidecar: its final Progress, which --resume compares and then skips the shard."""
    return f"{output_path}.json"


def _write_rows(path: pathlib.Path, view: Embeddings, show_progress_bar: bool) -> None:
    """The rows of `view` as one .npy at `path`, a block at a time, flushed to disk."""
    with open(path, "wb") as f:
        write_npy_header(f, len(view), view.shape[1], store_dtype_name(view.dtype))
        rows_per_block = max(1, COPY_BLOCK // max(1, view.shape[1] * view.dtype.itemsize))
        with tqdm(total=len(view), desc="merging", unit="row", unit_scale=True, disable=not show_progress_bar,
                  mininterval=2.0) as progress:
            for part in view.parts:
                for start in range(0, len(part), rows_per_block):
                    block = np.ascontiguousarray(part[start:start + rows_per_block])
                    f.write(block.tobytes())
                    progress.update(len(block))
        f.flush()
        os.fsync(f.fileno())


def default_merged_ids(output) -> str:
    """Where `encode --merge` writes the ids when no --ids is given: emb.npy -> emb.ids.txt."""
    return _stem(output) + ".ids.txt"


def merge(source, output, ids_output=None, overwrite: bool = False, show_progress_bar: bool = True) -> Embeddings:
    """Writes the rows (and ids, to `ids_output`) of a manifest, or any path open_embeddings reads, as one
    .npy: streamed, under a temporary name renamed at the end (a URL: staged locally, then uploaded).
    Returns the view it read."""
    view = open_embeddings(source)
    reading = [source, manifest_path(source), *view.files, *filter(None, view._ids_files)]
    sources = {str(p) if fileio.is_url(p) else os.path.abspath(str(p)) for p in reading}
    for target, flag in ((output, "OUT.npy"), (ids_output, "--ids")):
        if target is None:
            continue
        if (str(target) if fileio.is_url(target) else os.path.abspath(str(target))) in sources:
            raise ValueError(f"{flag} {target} is one of the files being merged; choose another")
        with fileio.explain_url_errors(target, "write"):
            exists = fileio.as_path(target).exists()
        if exists and not overwrite:
            raise FileExistsError(f"{target} already exists; pass --overwrite to replace it")
    if ids_output is not None and not view.has_ids:
        raise ValueError(f"{source} has no ids (the encode ran without --ids); drop --ids")
    if str(output) == str(ids_output):
        raise ValueError("the ids and the embeddings would go to the same file")

    def local_target(target) -> pathlib.Path:
        if not fileio.is_url(target):
            pathlib.Path(target).absolute().parent.mkdir(parents=True, exist_ok=True)
            return pathlib.Path(str(target) + ".partial")
        staging = fileio.RemoteMirror.staging_dir("merge:" + str(target))
        staging.mkdir(parents=True, exist_ok=True)
        return staging / posixpath.basename(str(target))

    ids = view.ids if ids_output is not None else None  # read (and checked against the rows) before writing
    staged_files = []
    try:
        tmp = local_target(output)
        staged_files.append(tmp)
        _write_rows(tmp, view, show_progress_bar)
        ids_tmp = None
        if ids_output is not None:
            ids_tmp = local_target(ids_output)
            staged_files.append(ids_tmp)
            with open(ids_tmp, "w") as f:
                f.write("".join(f"{i}\n" for i in ids))
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        # A full disk, Ctrl-C, a shard that fails while read: no half-written file is left behind.
        for staged in staged_files:
            staged.unlink(missing_ok=True)
        raise
    # The ids first: the embeddings file appearing is what says the merge is done.
    for staged, target in ((ids_tmp, ids_output), (tmp, output)):
        if staged is None:
            continue
        if fileio.is_url(target):
            copy_file(staged, target)
            staged.unlink()
        else:
            os.replace(staged, target)
    return view
