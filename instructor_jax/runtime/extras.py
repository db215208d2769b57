"""Optional dependencies (setup.cfg's extras): checked before a command does any work, and named with the
pip line that installs them when they are missing.

    extras.require("plot", "instructor-jax plot")      # raises MissingExtra if matplotlib is not installed

`MissingExtra` is a user error (the CLI prints its one line and exits 2), not a bug to report.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Optional

# extra -> the top-level modules it provides (those a command imports).
EXTRAS = {
    "torch": ("torch", "sentence_transformers"),
    "plot": ("matplotlib",),
    "tsne": ("sklearn",),  # installed by the plot extra; t-SNE maps only
    "mteb": ("mteb",),
    "tfds": ("tensorflow_datasets",),
    "gcs": ("gcsfs",),
    "serve": ("fastapi", "uvicorn", "prometheus_client"),
}
# The setup.cfg extra each entry above comes with.
INSTALLED_BY = {"tsne": "plot"}


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed."""


def pip_line(extra: str) -> str:
    return f"pip install 'instructor-jax[{INSTALLED_BY.get(extra, extra)}]'"


def missing_modules(extra: str) -> list[str]:
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raises MissingExtra naming the extra and its pip line if any of its modules is missing."""
    missing = missing_modules(extra)
    if missing:
        raise MissingExtra(f"{what} needs the '{INSTALLED_BY.get(extra, extra)}' extra ({', '.join(missing)} "
                           f"not installed): {pip_line(extra)}")


def extra_of_module(name: Optional[str]) -> Optional[str]:
    """The extra that provides the top-level module of `name` (a ModuleNotFoundError's .name), if any."""
    top = (name or "").split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return extra
    return None


def explain(error: ModuleNotFoundError) -> Optional[MissingExtra]:
    """A ModuleNotFoundError for a module one of our extras provides, as the MissingExtra to report."""
    extra = extra_of_module(error.name)
    if extra is None:
        return None
    return MissingExtra(f"{error.name} is not installed; it comes with the '{INSTALLED_BY.get(extra, extra)}' "
                        f"extra: {pip_line(extra)}")


class _NoTorchAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


def quiet_torch_advice() -> None:
    """transformers says "PyTorch was not found. Models won't be available ..." on import when torch is not
    installed; we use only its tokenizers and configs there, so the line alarms for nothing. Dropped from
    transformers' own logger only, and only that line (a logger filter; nothing else changes)."""
    logger = logging.getLogger("transformers")
    if not any(isinstance(f, _NoTorchAdvice) for f in logger.filters):
        logger.addFilter(_NoTorchAdvice())
