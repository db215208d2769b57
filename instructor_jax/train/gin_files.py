"""The gin files `--gin_file` takes: a path, or the name of a config shipped with the package.

The configs live in the repository's `configs/`; the package reaches them as `instructor_jax/configs` (a link
in a checkout, real files in a wheel, where they are package data), so `--gin_file tiny` works from any
directory once the package is installed.
"""

from __future__ import annotations

import pathlib

BUNDLED = pathlib.Path(__file__).parents[1] / "configs"


def bundled_names() -> list[str]:
    return sorted(p.stem for p in BUNDLED.glob("*.gin"))


def resolve_gin_file(name: str) -> str:
    """A path that exists is used as it is; otherwise `tiny`, `tiny.gin` or `configs/tiny.gin` name a bundled
    config. Anything else is an error listing the bundled ones."""
    if pathlib.Path(name).exists():
        return name
    stem = pathlib.PurePath(name).name.removesuffix(".gin")
    bundled = BUNDLED / f"{stem}.gin"
    if bundled.exists() and pathlib.PurePath(name).parent in (pathlib.PurePath("."), pathlib.PurePath("configs")):
        return str(bundled)
    raise FileNotFoundError(f"no gin file {name}; give a path, or one of the bundled configs: "
                            f"{', '.join(bundled_names())} (e.g. --gin_file tiny)")
