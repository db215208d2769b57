"""Outputs: what may be replaced, the modes they get, links out of a model directory, lock files, Ctrl-C."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from instructor_jax.runtime import fileio, locks
from instructor_jax.runtime.interrupts import GracefulStop


@pytest.fixture
def umask():
    def set_mask(mask):
        os.umask(mask)

    previous = os.umask(0o022)
    yield set_mask
    os.umask(previous)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_outputs_take_the_umask(tmp_path, umask, mask):
    umask(mask)
    with fileio.atomic_directory(tmp_path / "out") as staging:
        (staging / "sub").mkdir()
        (staging / "sub" / "file").write_text("x")
        os.chmod(staging / "sub" / "file", 0o600)  # as safetensors writes its files
    assert fileio.current_umask() == mask
    for path, full in ((tmp_path / "out", 0o777), (tmp_path / "out" / "sub", 0o777), (tmp_path / "out" / "sub" / "file", 0o666)):
        assert oct(path.stat().st_mode & 0o777) == oct(full & ~mask), path


def test_overwrite_replaces_only_what_the_check_allows(tmp_path):
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "a").write_text("old")
    with fileio.atomic_directory(tmp_path / "ours", True, lambda d: None) as staging:
        (staging / "a").write_text("new")
    assert (tmp_path / "ours" / "a").read_text() == "new"

    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "thesis.tex").write_text("years of work")
    for replaceable in (None, lambda d: "it holds thesis.tex"):
        with pytest.raises(fileio.RefusedOverwrite, match="refusing to replace .*precious"):
            with fileio.atomic_directory(tmp_path / "precious", True, replaceable):
                pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(fileio.RefusedOverwrite, match="it is a file"):
        fileio.check_replaceable(tmp_path / "file", True, lambda d: None)
    assert (tmp_path / "precious" / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ours", "precious"]  # no staging left


def test_overwrite_never_replaces_the_source_or_what_holds_it(tmp_path):
    source = tmp_path / "models" / "st"
    source.mkdir(parents=True)
    for destination, relation in ((tmp_path, "contains"), (source / "inner", "lies inside")):
        destination.mkdir(exist_ok=True)
        (destination / "x").write_text("x")
        with pytest.raises(fileio.RefusedOverwrite, match=relation):
            fileio.check_replaceable(destination, True, lambda d: None, protect=[source])


def test_links_must_stay_inside_the_model_directory(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("id_rsa")
    model = tmp_path / "model"
    model.mkdir()
    (model / "real").write_text("ok")
    (model / "inner").symlink_to("real")
    (model / "leak").symlink_to(secret)
    fileio.check_link_stays_inside(model / "real", model)
    fileio.check_link_stays_inside(model / "inner", model)
    with pytest.raises(fileio.UnsafeLink, match="leak: it is a symbolic link to .*secret, outside"):
        fileio.check_link_stays_inside(model / "leak", model)
    # The hub cache: a snapshot's files link into its own repository's blobs/, and nowhere else.
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0123abcd").write_text("tokenizer")
    snapshot = repo / "snapshots" / "f00ba4"
    snapshot.mkdir(parents=True)
    (snapshot / "tokenizer.json").symlink_to("../../blobs/0123abcd")
    (snapshot / "spiece.model").symlink_to(secret)
    fileio.check_link_stays_inside(snapshot / "tokenizer.json", snapshot)
    with pytest.raises(fileio.UnsafeLink, match="spiece.model"):
        fileio.check_link_stays_inside(snapshot / "spiece.model", snapshot)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_holder_is_refused_by_name(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "run.lock"
        lock.write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname(), "started": 0, "command": "x"}))
        with pytest.raises(locks.LockedError, match=f"in use by PID {sleeper.pid} on host {socket.gethostname()}"):
            locks.acquire(lock, "the workdir W")
        assert json.loads(lock.read_text())["pid"] == sleeper.pid  # left alone
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_stale_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 0}))
    with locks.held(lock, "the workdir W") as body:
        assert json.loads(lock.read_text()) == body and body["pid"] == os.getpid()
        with pytest.raises(locks.LockedError, match=f"PID {os.getpid()}"):
            locks.acquire(lock, "the workdir W")  # a second run in this process too
    assert "taking over the stale lock" in caplog.text
    assert not lock.exists() and not list(tmp_path.iterdir())


def test_a_lock_from_another_host_is_not_guessed_at(tmp_path):
    lock = tmp_path / "run.lock"
    lock.write_text(json.dumps({"pid": _dead_pid(), "host": "elsewhere", "started": 0}))
    with pytest.raises(locks.LockedError, match="on host elsewhere.*delete .*run.lock"):
        locks.acquire(lock, "the workdir W")


def test_first_ctrl_c_asks_to_stop_the_second_exits_at_once(monkeypatch, capsys):
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under nohup / a background job
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested and not exits
        os.kill(os.getpid(), signal.SIGINT)
        assert exits == [130]
    assert signal.getsignal(signal.SIGINT) is before  # restored, whatever it was
    assert "Ctrl-C again to quit at once" in capsys.readouterr().err


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_a_read_only_folder_is_named_not_the_lock_draft(tmp_path, monkeypatch):
    import errno
    import pathlib

    folder = tmp_path / "read-only"
    folder.mkdir()
    real = pathlib.Path.write_text

    def refuse(self, *args, **kwargs):  # what a folder without write permission (or a read-only mount) does
        if self.parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", refuse)
    with pytest.raises(PermissionError) as error:
        locks.acquire(folder / "emb.npy.lock", f"the output {folder / 'emb.npy'}")
    assert str(error.value) == (f"cannot write in the folder {folder} (Permission denied), where the output "
                                f"{folder / 'emb.npy'} goes: make it writable, or choose another place")


@pytest.mark.fast
def test_a_new_destination_inside_the_source_is_refused(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for destination in (source / "out", source / "deeper" / "out"):
        with pytest.raises(fileio.RefusedOverwrite, match=f"refusing to write {destination}: it lies inside {source}"):
            fileio.check_replaceable(destination, False, protect=[source])
    fileio.check_replaceable(tmp_path / "beside", False, protect=[source])  # outside: fine
