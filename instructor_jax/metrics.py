"""FLOP counts, MFU, and the writers for per-step metrics (JSONL and TensorBoard)."""

from __future__ import annotations

import json
import pathlib
import time
from typing import Optional

import numpy as np

from instructor_jax.config import EncoderConfig


def encoder_flops(lengths, cfg: EncoderConfig, dense_features: Optional[int] = None) -> float:
    """Forward FLOPs of a T5 encoder plus Dense over sequences of the given real (unpadded) lengths.

    Per token: 2 x the matmul parameters (q, k, v, o and the feed-forward, gated or not); per sequence
    of length L and per layer: the two L x L attention products, 2 x 2 x L^2 x heads x d_kv.
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    ffn = (3 if cfg.is_gated else 2) * d * cfg.d_ff
    per_token = cfg.num_layers * 2 * (4 * d * inner + ffn)
    attention = cfg.num_layers * 4 * inner * float(np.sum(lengths ** 2))
    dense = 2 * d * (dense_features or 0) * len(lengths)
    return per_token * float(lengths.sum()) + attention + dense


# The attention scores' elementwise work (position bias, mask, softmax over [heads, L, L]) is not in the FLOP
# count, and it does not run at matmul speed: encoding 8,192 tokens with t5-small on 2 CPU cores took 1.42 s
# in rows of 64 and 1.97 s in rows of 256, about 6.5x what the extra attention FLOPs explain at the
# matmuls' rate. Layout choices (packed or not, which row lengths) weigh the attention FLOPs by this factor:
# with it, 192 short texts pack into 128-token rows rather than 256 (1.24 slots per token, not 1.10) and
# encode ~10% faster (tools/bench_encode.py --size small --lengths short).
ATTENTION_COST_WEIGHT = 6.0


def layout_cost(lengths, cfg: EncoderConfig, dense_features: Optional[int] = None) -> float:
    """What computing rows of these lengths (padding included) costs, in matmul-FLOP equivalents: for
    choosing between layouts of the same inputs, not for MFU."""
    lengths = np.asarray(lengths, dtype=np.float64)
    attention = cfg.num_layers * 4 * cfg.num_heads * cfg.d_kv * float(np.sum(lengths ** 2))
    return encoder_flops(lengths, cfg, dense_features) + (ATTENTION_COST_WEIGHT - 1) * attention


def measure_matmul_peak(dtype: str = "float32", size: Optional[int] = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of a square matmul on one device: the denominator of MFU on machines without a
    published peak (CPUs), and a sanity check elsewhere."""
    import jax
    import jax.numpy as jnp

    device = jax.local_devices()[0]
    size = size or (2048 if device.platform == "cpu" else 8192)
    x = jax.device_put(jnp.ones((size, size), jnp.bfloat16 if dtype == "bfloat16" else jnp.float32), device)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = matmul(x)
    out.block_until_ready()
    return repeats * 2 * size ** 3 / (time.perf_counter() - start)


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
