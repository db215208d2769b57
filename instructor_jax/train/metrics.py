"""The per-step metrics of a training run, written as JSON lines (metrics.jsonl) and TensorBoard events."""

from __future__ import annotations

import json
import pathlib


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl` and TensorBoard events in `workdir/tensorboard`.

    Only one process of a multi-host job should write (pass enabled=False elsewhere).
    """

    def __init__(self, workdir, enabled: bool = True):
        self.enabled = enabled
        self._jsonl = None
        self._tensorboard = None
        if enabled:
            workdir = pathlib.Path(workdir)
            self._jsonl = open(workdir / "metrics.jsonl", "a", encoding="utf-8")
            from tensorboardX import SummaryWriter

            self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        self._jsonl.flush()
        for name, value in values.items():
            self._tensorboard.add_scalar(name, value, int(step))

    def flush(self) -> None:
        """Everything written so far on disk (metrics.jsonl is flushed line by line already)."""
        if self.enabled:
            self._tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tensorboard.close()
