"""Advisory lock files: one run per workdir or per encode output.

Two runs writing the same place interleave their outputs and both report success. A lock is a small file
whose JSON body names its holder (PID, host, start time, command); it is created whole with a hard link,
so a reader never sees it half-written. A second run reads it and refuses with that information. A lock
whose holder is dead (same host, no such process) is stale: it is taken over, with a warning. A holder
on another host cannot be checked from here, so its lock is only ever removed by hand.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import pathlib
import socket
import sys
import time
from typing import Optional

log = logging.getLogger(__name__)


class LockedError(OSError):
    """Another live run holds the lock; the message names it and says what to do."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, run by another user
    return True


def _read(path: pathlib.Path) -> Optional[dict]:
    try:
        holder = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    since = holder.get("started")
    when = time.strftime(" since %Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else ""
    return f"PID {holder.get('pid', '?')} on host {holder.get('host', '?')}{when} ({holder.get('command', '?')})"


def acquire(path, what: str) -> dict:
    """Creates the lock file `path` for this process, taking over a stale one; returns its body.

    Raises LockedError if a live process holds it. `what` names the locked thing in messages.
    """
    path = pathlib.Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
          "command": " ".join([pathlib.Path(sys.argv[0]).name, *sys.argv[1:]])[:300]}
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
        draft = path.with_name(f"{path.name}.{me['host']}.{me['pid']}.tmp")
        try:
            draft.write_text(json.dumps(me))
        except OSError as e:  # said of the folder and what goes there, not of this temporary name
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise PermissionError(f"cannot write in the folder {path.parent} ({e.strerror}), where {what} goes: make "
                                  "it writable, or choose another place") from None
        try:
            os.link(draft, path)  # atomic, and fails if the lock exists: the O_EXCL of a whole file
            return me
        except FileExistsError:
            pass
        finally:
            draft.unlink(missing_ok=True)
        holder = _read(path)
        if holder is None:
            continue  # released meanwhile: try again
        pid, host = holder.get("pid"), holder.get("host")
        if host == me["host"] and isinstance(pid, int) and not _alive(pid):
            log.warning("taking over the stale lock %s of %s: that process is gone", path, _describe(holder))
            # Whoever removes it first wins; the other sees FileExistsError again and reads the new holder.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        if not holder:
            raise LockedError(f"{what} is locked by {path}, which cannot be read; if no other run uses {what}, "
                              f"delete {path} and rerun")
        advice = ("wait for it to finish or stop it" if host == me["host"] else
                  f"wait for it to finish; if that process is gone, delete {path} (its host is not this one, "
                  "so whether it still runs cannot be checked from here)")
        raise LockedError(f"{what} is in use by {_describe(holder)}: {advice}, or choose another")
    raise LockedError(f"could not take the lock {path}: other runs keep taking it; try again")


def release(path, body: dict) -> None:
    """Removes the lock file if it is still the one `acquire` wrote."""
    path = pathlib.Path(path)
    holder = _read(path)
    if holder and holder.get("pid") == body["pid"] and holder.get("host") == body["host"] \
            and holder.get("started") == body["started"]:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def held(path, what: str):
    """The lock file `path` held for the duration of the block (see `acquire`)."""
    body = acquire(path, what)
    try:
        yield body
    finally:
        release(path, body)
