"""Where a model given by path or hub id lives on this machine (imports no JAX: conversion uses it too).

A local path is used as it is. A hub id ("hkunlp/instructor-large") is fetched with huggingface_hub's
`snapshot_download`, which returns `<cache>/models--ORG--NAME/snapshots/<commit>/`; the id itself is kept,
since it is evidence of which model this is (see instructor_jax.checkpoints.pooling_evidence).
"""

from __future__ import annotations

import pathlib
import re
from typing import Optional

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# README.md is the model card: evidence of which model this is (see instructor_jax.checkpoints.pooling_evidence).
HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "README.md"]


def hub_download_command(hub_id: str) -> str:
    """The download command the installed huggingface_hub provides (`hf` since 0.34, `huggingface-cli` before)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    try:
        new_cli = Version(version("huggingface_hub")) >= Version("0.34")
    except PackageNotFoundError:
        new_cli = True
    return f"{'hf' if new_cli else 'huggingface-cli'} download {hub_id} --local-dir DIR"


def _looks_local(name: str) -> bool:
    """A string the user meant as a path: explicitly relative or absolute, deeper than ORG/NAME, or an
    ORG/NAME whose first part is a local directory (`runs/modl` beside `runs/`)."""
    if name.startswith(("/", ".", "~")) or "\\" in name or not HUB_ID.match(name):
        return True
    return pathlib.Path(name.split("/", 1)[0]).expanduser().is_dir()


def _missing_path_error(path: pathlib.Path) -> FileNotFoundError:
    import difflib

    message = f"{path} does not exist"
    parent = path.parent if str(path.parent) else pathlib.Path(".")
    if parent.is_dir():
        close = difflib.get_close_matches(path.name, [p.name for p in parent.iterdir() if p.is_dir()], n=3)
        if close:
            message += f"; did you mean {' or '.join(str(parent / c) for c in close)}?"
    return FileNotFoundError(message)


def resolve_model(name_or_path) -> tuple[pathlib.Path, Optional[str]]:
    """(directory, hub id or None): a local directory as is; a hub id ("hkunlp/instructor-large") fetched
    with huggingface_hub. A string that looks like a local path and does not exist is a missing path."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path, None
    name = str(name_or_path)
    if _looks_local(name):
        raise _missing_path_error(path)
    try:
        from huggingface_hub import snapshot_download

        # A .bin is fetched only where no safetensors exists; allow_patterns cannot express that, so
        # take both (the hkunlp repositories hold only .bin files).
        return pathlib.Path(snapshot_download(name, allow_patterns=HUB_FILES)), name
    except Exception as e:  # offline, unknown repo, gated repo, ...: one message with the way out
        raise OSError(f"{name} is not a local directory, and fetching it from the Hugging Face hub failed "
                      f"({type(e).__name__}: {e}). If this machine is offline, download the model on one that "
                      f"is online (`{hub_download_command(name)}`), copy DIR here and pass its path instead of "
                      "the hub id") from e


def resolve_model_path(name_or_path) -> pathlib.Path:
    """The local directory of a model given by path or hub id (see `resolve_model`)."""
    return resolve_model(name_or_path)[0]
