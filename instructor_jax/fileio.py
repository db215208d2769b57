"""Writing outputs so that nothing half-written ever carries the final name."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False):
    """Yields a temporary directory beside `destination`; renames it into place only on success.

    On any error, or if the process dies, `destination` is untouched (an existing one is kept unless the
    write succeeded and `overwrite` is set). The temporary name starts with '.' and says 'partial'.
    """
    destination = pathlib.Path(destination).absolute()
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another destination or pass "
                              "overwrite=True (--overwrite on the command line) to replace it")
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(destination.parent, os.W_OK):
        raise PermissionError(f"cannot write into {destination.parent}")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        if destination.exists():
            # Keep the old copy until the new one is in place, so some complete version always exists.
            retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{destination.name}.old-", dir=destination.parent))
            os.replace(destination, retired / "old")
            os.replace(staging, destination)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, destination)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
