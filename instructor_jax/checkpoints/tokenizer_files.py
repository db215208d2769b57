"""Tokenizer files copied with a checkpoint: which files, and never one that a link points outside the source."""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Optional

from instructor_jax.runtime.fileio import check_link_stays_inside

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model",
                   "added_tokens.json")


def copy_tokenizer(source, destination, model_max_length: Optional[int] = None) -> None:
    source, destination = pathlib.Path(source), pathlib.Path(destination)
    copied = [name for name in TOKENIZER_FILES if (source / name).exists()]
    if "tokenizer.json" not in copied and "spiece.model" not in copied:
        raise FileNotFoundError(f"no tokenizer files in {source} (expected tokenizer.json or spiece.model)")
    for name in copied:
        check_link_stays_inside(source / name, source)  # copying follows links: never copy what lies elsewhere
        shutil.copyfile(source / name, destination / name)
    config_path = destination / "tokenizer_config.json"
    if model_max_length is not None and config_path.exists():
        # sentence-transformers 6 reads max_seq_length from here.
        config = json.loads(config_path.read_text())
        config["model_max_length"] = model_max_length
        config_path.write_text(json.dumps(config, indent=2) + "\n")
