"""The run's workdir: checked and locked before any compute, mirrored to a URL, its metrics trimmed on resume,
and the exports (instructor-jax and sentence-transformers) written at the end."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import shutil
import socket
from typing import Optional

import gin

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.runtime import fileio, sharding
from instructor_jax.model.config import InstructorConfig
from instructor_jax.model.encoder import unstack_layers

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


LOCK_NAME = ".instructor-jax.lock"


EXPORTS = ("model", "sentence_transformers")


def check_workdir(workdir) -> None:
    """Fails before any compute if the workdir cannot be written."""
    workdir = pathlib.Path(workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{socket.gethostname()}-{os.getpid()}"  # hosts share the workdir
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise PermissionError(f"cannot write to the workdir {workdir}: {e}; choose another --workdir") from e


def open_workdir(workdir, is_chief: bool) -> tuple[pathlib.Path, Optional[fileio.RemoteMirror]]:
    """(local directory the run writes its logs and exports in, mirror uploading it or None).

    A local workdir is used as is. A URL workdir (gs://bucket/run) gets a local staging directory that
    process 0 uploads after each checkpoint and at the end; its checkpoints go to URL/checkpoints through
    orbax directly, from every process. A resumed run first fetches the metrics logged so far.
    """
    if not fileio.is_url(workdir):
        check_workdir(workdir)
        return pathlib.Path(workdir).absolute(), None
    remote = str(workdir).rstrip("/")
    staging = fileio.RemoteMirror.staging_dir(remote)
    if not is_chief:
        return staging, None  # only process 0 writes logs and exports
    shutil.rmtree(staging, ignore_errors=True)  # left by an earlier run: the URL holds the truth
    staging.mkdir(parents=True)
    mirror = fileio.RemoteMirror(staging, remote)
    with fileio.explain_url_errors(remote, "use the workdir"):
        for name in ("metrics.jsonl", "config.gin", SETTINGS_RECORD):
            mirror.pull(name)
    return staging, mirror


class Workdir:
    """Where the run writes: the local directory (a URL's staging copy), the name the user gave, and the
    mirror that uploads a URL workdir's logs and exports (process 0; nothing for a local workdir)."""

    def __init__(self, workdir, cfg, is_chief: bool):
        self.is_chief = is_chief
        self.name = str(workdir).rstrip("/")  # as the user gave it: a path or a URL
        self.path, self.mirror = open_workdir(workdir, is_chief)
        if is_chief and cfg.export and self.mirror is None:
            check_exports_replaceable(self.path)

    def record_settings(self, cfg, resumed_at: Optional[int]) -> None:
        """Writes config.gin and the settings record, once it is known whether the run resumes (at step
        `resumed_at`); a resume with other run-defining settings is refused (see `record_settings`)."""
        if self.is_chief:
            record_settings(self.path, cfg, resumed_at, shown=self.name)
        self.sync(first=True)  # a URL workdir that cannot be written fails here, before any compute

    def checkpoint_dir(self, cfg):
        # A URL (gs://...) is handed to orbax as is: it writes through tensorstore.
        return cfg.checkpoint_dir or (f"{self.name}/checkpoints" if fileio.is_url(self.name)
                                      else self.path / "checkpoints")

    def sync(self, first: bool = False) -> None:
        """Uploads new logs and exports to a URL workdir (process 0); nothing for a local one."""
        if self.mirror is None:
            return
        try:
            with fileio.explain_url_errors(self.name, "write to the workdir"):
                self.mirror.push()
        except OSError as e:
            if first:
                raise
            log.error("could not upload the logs (retried at the next checkpoint): %s", e)


SETTINGS_RECORD = "train_config.json"  # the TrainConfig that trained the workdir's checkpoints, as JSON


class ChangedSettings(ValueError):
    """A resume whose run-defining settings differ from those that trained the checkpoints."""


def settings_of(cfg) -> dict:
    """The TrainConfig as JSON values (tuples as lists, the encoder and head configs as objects)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def _differs(saved, current) -> bool:
    """Whether a recorded setting differs from the current one. A field that a config (the encoder's, say)
    gained after the record was written is not a change: the record predates it."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return any(key not in current or _differs(value, current[key]) for key, value in saved.items())
    return saved != current


def record_settings(workdir: pathlib.Path, cfg, resumed_at: Optional[int], shown=None) -> None:
    """Writes W/config.gin and W/train_config.json for this run. A run resuming at step N (`resumed_at`)
    first compares its run-defining settings (config.RUN_DEFINING_FIELDS) with the record: a change is
    refused, naming the settings, unless TrainConfig.accept_changed_settings, which keeps the files that
    describe steps 1..N as config.gin.before_step_N and train_config.json.before_step_N."""
    from instructor_jax.train.config import RUN_DEFINING_FIELDS

    record, current = workdir / SETTINGS_RECORD, settings_of(cfg)
    if resumed_at is not None and record.exists():
        saved = json.loads(record.read_text())
        changed = [f"{name} {saved.get(name)!r} -> {current[name]!r}" for name in RUN_DEFINING_FIELDS
                   if name in saved and _differs(saved[name], current[name])]
        if changed and not cfg.accept_changed_settings:
            raise ChangedSettings(
                f"{shown or workdir} holds checkpoints up to step {resumed_at}, trained with other settings than "
                f"this run's: {'; '.join(changed)}. Going on would make config.gin describe steps that ran "
                f"otherwise. Resume with the settings that trained it (its config.gin), start a new --workdir, or "
                "bind TrainConfig.accept_changed_settings = True to go on with the new settings (config.gin."
                f"before_step_{resumed_at} then keeps the old ones)")
        if changed:
            log.warning("resuming at step %d with changed settings (%s); steps up to %d were trained with "
                        "config.gin.before_step_%d", resumed_at, "; ".join(changed), resumed_at, resumed_at)
            for name in ("config.gin", SETTINGS_RECORD):
                kept = workdir / f"{name}.before_step_{resumed_at}"
                # An earlier accepted change at this same step kept the true description already.
                if (workdir / name).exists() and not kept.exists():
                    os.replace(workdir / name, kept)
    elif resumed_at is not None:
        log.warning("%s has no %s (a workdir from an older version): the settings of the steps already trained "
                    "are not known, so not compared with this run's", shown or workdir, SETTINGS_RECORD)
    earlier = sorted(workdir.glob("config.gin.before_step_*"), key=lambda p: int(p.name.rsplit("_", 1)[1]))
    notes = "".join(f"# steps up to {p.name.rsplit('_', 1)[1]} were trained with other settings: see {p.name}\n"
                    for p in earlier)
    (workdir / "config.gin").write_text(notes + (gin.config_str() or "# defaults of instructor_jax.TrainConfig\n"))
    (workdir / SETTINGS_RECORD).write_text(json.dumps(current, indent=1) + "\n")


def check_exports_replaceable(workdir: pathlib.Path) -> None:
    """Exports go to W/model and W/sentence_transformers only if those are absent or our own earlier
    exports: a workdir's `model/` may be something else (a Python package, say)."""
    for name in EXPORTS:
        try:
            fileio.check_replaceable(workdir / name, True, convert.foreign_content)
        except fileio.RefusedOverwrite as e:
            raise fileio.RefusedOverwrite(f"{e}; the run exports to {workdir / name} at the end: choose another "
                                          "--workdir, or set TrainConfig.export = False") from None


def truncate_metrics(path: pathlib.Path, step: int, is_chief: bool) -> None:
    """Drops metric lines written after the checkpoint being resumed, which the resumed run writes again."""
    if not is_chief or not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def export(workdir: pathlib.Path, config: InstructorConfig, params, tokenizer_dir, is_chief: bool,
            shown: str) -> None:
    """W/model (instructor-jax) and W/sentence_transformers (PyTorch), written by process 0 only."""
    flat = tensor_table.flatten_params(sharding.gather_to_host(params))  # every process takes part
    if not is_chief:
        return
    flat = unstack_layers(flat)  # files hold one entry per layer, whatever the run's scan_layers
    # How this run computed is not part of the model: the export computes as any machine can.
    export_config = config.replace(encoder=dataclasses.replace(config.encoder, dtype="float32", remat=False,
                                                               scan_layers=False, attention="xla", fused_qkv=False,
                                                               bfloat16_elementwise=False))
    # Only over our own earlier exports (checked before the run too): see check_exports_replaceable.
    with fileio.atomic_directory(workdir / "model", True, convert.foreign_content) as staging:
        convert.write_native(staging, export_config, flat, tokenizer_dir)
    with fileio.atomic_directory(workdir / "sentence_transformers", True, convert.foreign_content) as staging:
        convert.write_sentence_transformers(staging, export_config, flat, tokenizer_dir)
    print(f"exported {shown}/model (instructor-jax) and {shown}/sentence_transformers "
          "(sentence-transformers / PyTorch)", flush=True)

