"""JSON Lines files read with their line numbers, so that every error names the file and the line."""

from __future__ import annotations

import json
from typing import Any, Iterator


def numbered_lines(path, hint: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line. A line that is not JSON is a ValueError naming the file
    and line, followed by `hint` (say, what the file should hold). A byte-order mark is skipped."""
    with open(path, encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {number}: not JSON ({e.msg}){hint}") from None
            yield number, value
