"""What identifies a model's weights, for `encode --resume`: the same path may hold other weights later.

The signature lists each weights file's size and modification time (cheap to compare) and a SHA-256 of
their contents. Two signatures match if their lists are equal, or else if their content hashes are: a
copied or touched but unchanged model still resumes, replaced weights do not.
"""

from __future__ import annotations

import hashlib
import pathlib
from typing import Optional

import numpy as np

WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_root(source: Optional[pathlib.Path]) -> Optional[pathlib.Path]:
    """The directory holding all of a loaded model's weights. `Instructor.source` is its tokenizer's
    directory: the model itself, or for a re-saved sentence-transformers layout (0_Transformer/) its
    parent, which also holds the Dense module."""
    if source is None or not pathlib.Path(source).is_dir():
        return None
    source = pathlib.Path(source)
    if not (source / "modules.json").exists() and (source.parent / "modules.json").exists():
        return source.parent
    return source


def weight_files(root: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in root.rglob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def _stats(root: pathlib.Path, files) -> list:
    return [[p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def _content_hash(root: pathlib.Path, files) -> str:
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def _params_hash(params) -> str:
    """For a model built in memory, with no files: its parameters' bytes."""
    from instructor_jax.checkpoints import tensor_table
    from instructor_jax.runtime import sharding

    digest = hashlib.sha256()
    for name, value in sorted(tensor_table.flatten_params(sharding.gather_to_host(params)).items()):
        value = np.asarray(value)
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()


def signature(model) -> dict:
    """{"files": [[name, size, mtime_ns], ...], "sha256": ...} for an `Instructor`."""
    root = model_root(getattr(model, "source", None))
    files = weight_files(root) if root is not None else []
    if not files:
        return {"files": [], "sha256": _params_hash(model.params)}
    return {"files": _stats(root, files), "sha256": _content_hash(root, files)}


def same_weights(saved: dict, model, current: Optional[dict] = None) -> bool:
    """Whether `model` holds the weights `saved` describes; hashes only when the cheap check differs."""
    root = model_root(getattr(model, "source", None))
    files = weight_files(root) if root is not None else []
    if files and saved.get("files") == _stats(root, files):
        return True
    current = current or signature(model)
    return saved.get("sha256") == current["sha256"]
