"""FLOP counts: of the encoder (for MFU), of a batch layout as it runs (for the layout planner), and the
matmul peak measured on this machine."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from instructor_jax.model.config import EncoderConfig


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
# count, and neither it nor XLA:CPU's batched products run at matmul speed. Layout choices (packed or not,
# which row lengths) weigh the attention FLOPs by this factor. Measured on 2 CPU cores, t5-small:
# - tools/measure_attention_cost.py (the same tokens in rows of 64 to 512) fits 3.5 on one CPU device and
#   2.4 on the 4 that instructor_jax now asks for (host_devices);
# - the layouts themselves, alternated in one process on 192 short texts (bench_encode's): at 6, 128-token
#   rows, 1.24 slots per token, 40.6 sentences/s; at 2, 256-token rows, 1.10 slots, 38.9 sentences/s.
# The fit sees only the attention; a layout also differs in its rows per batch and its last batch's
# padding rows, and end to end 6 chose the faster. (Earlier, on another 2-core machine and one device:
# 8,192 tokens took 1.42 s in rows of 64 and 1.97 s in rows of 256, 6.5x what the FLOPs explain.)
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
