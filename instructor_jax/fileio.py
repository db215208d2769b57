"""Writing outputs so that nothing half-written ever carries the final name; local paths and URLs."""

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


def is_url(path) -> bool:
    return "://" in str(path)


def as_path(path):
    """`pathlib.Path` for a local path; `etils.epath.Path` for a URL (gs://, s3://: through gcsfs or
    TensorFlow, whichever is installed). Both offer read_bytes/write_bytes/exists/mkdir."""
    if is_url(path):
        from etils import epath  # orbax's own path library, so always installed alongside it

        return epath.Path(path)
    return pathlib.Path(path)


@contextlib.contextmanager
def explain_url_errors(path, doing: str):
    """For a URL, re-raises its backend's error (a missing library, credentials, the network) as an OSError
    that says what to do; a missing file stays FileNotFoundError. Local paths pass through untouched."""
    try:
        yield
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - each backend (gcsfs, TensorFlow, fsspec) raises its own types
        if not is_url(path):
            raise
        raise OSError(f"cannot {doing} {path}: {e}; this needs a filesystem library for the URL's scheme "
                      "(for gs://: pip install 'instructor-jax[gcs]', i.e. gcsfs) and credentials "
                      "(gcloud auth application-default login)") from e


class RemoteMirror:
    """A local directory uploaded file by file to a URL: how a gs:// workdir gets its logs and exports.

    Cloud objects can be neither appended to (metrics.jsonl grows line by line; TensorBoard event files
    too) nor renamed (exports are renamed into place), so those are written in a local staging directory
    and each file that changed since the last `push` is uploaded whole. An upload replaces its object
    atomically, so a reader sees either the previous or the new copy of a file, never a torn one.
    """

    def __init__(self, local: pathlib.Path, remote: str):
        self.local, self.remote = pathlib.Path(local), str(remote).rstrip("/")
        self._pushed: dict[str, tuple[int, int]] = {}

    @staticmethod
    def staging_dir(remote: str) -> pathlib.Path:
        """A local directory for `remote`, the same on every run (so a resumed run finds it)."""
        import hashlib

        digest = hashlib.sha256(str(remote).rstrip("/").encode()).hexdigest()[:16]
        return pathlib.Path(tempfile.gettempdir(), "instructor_jax_staging", digest)

    def pull(self, name: str) -> None:
        """Downloads remote/name into the staging directory if it exists there (a resumed run's log)."""
        source = as_path(f"{self.remote}/{name}")
        if source.exists():
            target = self.local / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            self._pushed[name] = self._signature(target)

    def push(self) -> int:
        """Uploads every local file that is new or changed since the last push; returns how many."""
        count = 0
        for path in sorted(p for p in self.local.rglob("*") if p.is_file()):
            name = path.relative_to(self.local).as_posix()
            if any(part.startswith(".") for part in name.split("/")):
                continue  # atomic_directory's staging copies: only finished outputs go up
            signature = self._signature(path)
            if self._pushed.get(name) == signature:
                continue
            target = as_path(f"{self.remote}/{name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
            self._pushed[name] = signature
            count += 1
        return count

    @staticmethod
    def _signature(path: pathlib.Path) -> tuple[int, int]:
        stat = path.stat()
        return stat.st_size, stat.st_mtime_ns
