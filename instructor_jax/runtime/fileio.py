"""Writing outputs so that nothing half-written ever carries the final name; local paths and URLs."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import threading
from typing import Callable, Optional, Sequence


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc; elsewhere it can only be read by setting it."""
    try:
        for line in pathlib.Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


_UMASK_LOCK = threading.Lock()


def apply_umask(root) -> None:
    """Gives `root` and everything under it the modes `open()` and `mkdir()` would have given them.

    tempfile.mkdtemp makes 0700 directories and safetensors writes 0600 files, whatever the umask; an
    output others should read (a colleague, or a container that runs as another user than the one that
    built it) needs the user's own setting instead.
    """
    mask = current_umask()
    root = pathlib.Path(root)
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


class UnsafeLink(PermissionError):
    """A file in a model directory is a symbolic link to somewhere outside that directory."""


def _hub_repository(path: pathlib.Path) -> Optional[pathlib.Path]:
    """The hub cache repository (.../models--ORG--NAME) a path lies in, through its snapshots/, or None."""
    parts = path.absolute().parts
    for i in range(len(parts) - 2):
        if parts[i].startswith(("models--", "datasets--", "spaces--")) and parts[i + 1] == "snapshots":
            return pathlib.Path(*parts[:i + 1])
    return None


def check_link_stays_inside(path, root) -> None:
    """Raises UnsafeLink if `path`, a file under `root`, resolves (through symbolic links) outside `root`.

    A model directory from an untrusted source could link `spiece.model` to ~/.ssh/id_rsa, and copying
    follows links. The one exception is the hub cache's own layout, where every file of a snapshot is a
    link into its repository's blobs/ (models--ORG--NAME/snapshots/HASH/file -> ../../blobs/SHA).
    """
    path, root = pathlib.Path(path), pathlib.Path(root)
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return
    repository = _hub_repository(path)
    if repository is not None and target.is_relative_to((repository / "blobs").resolve()):
        return
    raise UnsafeLink(f"refusing to read {path}: it is a symbolic link to {target}, outside {root}. A model "
                     "directory's files must lie inside it; if you trust that file, copy it in place of the link")


def check_no_links_out(directory) -> None:
    """`check_link_stays_inside` for every symbolic link under `directory` (a model directory: its weights,
    configs and tokenizer files are all read from it), before any is read. Links to directories are
    checked, not followed."""
    directory = pathlib.Path(directory)
    for parent, folders, files in os.walk(directory):
        for name in (*folders, *files):
            path = pathlib.Path(parent, name)
            if path.is_symlink():
                check_link_stays_inside(path, directory)


class RefusedOverwrite(FileExistsError):
    """An existing destination that --overwrite may not replace; the message says why."""


def check_replaceable(destination, overwrite: bool, replaceable: Optional[Callable[[pathlib.Path], Optional[str]]] = None,
                      protect: Sequence = ()) -> None:
    """Raises unless writing `destination` is safe: it is absent, or `overwrite` is set and it is a
    directory that `replaceable` recognises (it returns None, else the reason it is not ours) and that
    neither contains nor lies inside any path in `protect` (the source being read, say). A new
    destination inside a protected path is refused too: it would become part of what it was made from,
    and a rerun could then not replace it."""
    destination = pathlib.Path(destination).absolute()
    if not (destination.exists() or destination.is_symlink()):
        inside = [str(p) for p in protect if pathlib.Path(p).resolve() in destination.resolve().parents]
        if inside:
            raise RefusedOverwrite(f"refusing to write {destination}: it lies inside {inside[0]}, which this run "
                                   "reads; choose a destination outside it")
        return
    if not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another destination or pass "
                              "overwrite=True (--overwrite on the command line) to replace it")
    if destination.is_symlink() or not destination.is_dir():
        raise RefusedOverwrite(f"refusing to replace {destination}: it is a "
                               f"{'symbolic link' if destination.is_symlink() else 'file'}, not a model directory "
                               "this program wrote; choose another destination")
    real = destination.resolve()
    for other in protect:
        other = pathlib.Path(other).resolve()
        relation = ("is" if other == real else "contains" if real in other.parents
                    else "lies inside" if other in real.parents else None)
        if relation is not None:
            raise RefusedOverwrite(f"refusing to replace {destination}: it {relation} {other}, which this run "
                                   "reads; choose a destination outside it")
    if not any(destination.iterdir()):
        return  # an empty directory: nothing to lose
    reason = "nothing says what it holds" if replaceable is None else replaceable(destination)
    if reason is not None:
        raise RefusedOverwrite(f"refusing to replace {destination}: {reason}. Only a model directory this program "
                               "wrote (its files and nothing else) is replaced; move it away or choose another "
                               "destination")


@contextlib.contextmanager
def atomic_directory(destination, overwrite: bool = False,
                     replaceable: Optional[Callable[[pathlib.Path], Optional[str]]] = None, protect: Sequence = ()):
    """Yields a temporary directory beside `destination`; renames it into place only on success.

    On any error, or if the process dies, `destination` is untouched (an existing one is kept unless the
    write succeeded and `overwrite` is set). With `overwrite`, an existing destination is replaced only
    if `check_replaceable` allows it (checked before the caller writes anything). The temporary name
    starts with '.' and says 'partial'. The result takes the user's umask.
    """
    destination = pathlib.Path(destination).absolute()
    check_replaceable(destination, overwrite, replaceable, protect)
    destination.parent.mkdir(parents=True, exist_ok=True)
    if not os.access(destination.parent, os.W_OK):
        raise PermissionError(f"cannot write into {destination.parent}")
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        yield staging
        apply_umask(staging)
        if destination.exists():
            # Checked again: the destination may have changed while the new copy was being written.
            check_replaceable(destination, overwrite, replaceable, protect)
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
