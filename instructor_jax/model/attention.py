"""Self-attention with T5's relative position bias, through one of several implementations.

    xla         einsum, float32 scores + bias, softmax, dropout on the weights, einsum: what the encoder has
                always computed (the PyTorch parity tests hold it to 1e-5). Runs everywhere; the default.
    cudnn       `jax.nn.dot_product_attention(implementation="cudnn")`, cuDNN's fused attention (NVIDIA
                sm80+, bfloat16). Unpacked rows go in as lengths with the one [1, heads, T, T] bias every
                row shares; packed rows add their segment mask, which the call folds into the bias.
    pallas_tpu  Pallas' TPU flash attention (`jax.experimental.pallas.ops.tpu.flash_attention`): the bias
                broadcast to [B, heads, T, T] (the kernel's `ab`, with its gradient) and segment ids.
    auto        the implementation a device check measured faster on this platform and layout
                (`MEASURED_FASTER`), else xla.

The encoder calls `prepare` once per forward pass (the mask, lengths or broadcast bias every layer shares)
and `attend` in every layer. `check` refuses, before anything is computed, what an implementation cannot
run, naming the limit and the implementation that can. Padding positions of the output may differ between
implementations (cudnn zeroes them, xla and pallas_tpu attend them to different keys); they are never
pooled, and the real positions agree. See docs/attention.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from instructor_jax.runtime import sharding

IMPLEMENTATIONS = ("xla", "cudnn", "pallas_tpu")
NAMES = ("auto", *IMPLEMENTATIONS)

# What `auto` may pick: (platform, layout) -> implementation, where layout is "packed" or "unpacked".
# An entry belongs here only once tools/device_checks.sh (the encode_attention_* and train_attention_*
# checks) has measured that implementation faster than xla on that platform, with parity against xla.
# Nothing has been measured on an accelerator yet, so it is empty and auto is xla everywhere.
MEASURED_FASTER: dict[tuple[str, str], str] = {}

# The Pallas kernel's lane width: its segment-id masks and its backward pass tile the keys by 128, so rows
# are padded to a multiple of it inside the call. Up to WHOLE_ROW_BLOCK one block covers the whole row (the
# kernel's default of 128 is too small for v5e: JAX issue #24633); longer rows use the largest block of
# BLOCK_CHOICES that divides them.
PALLAS_LANES = 128
WHOLE_ROW_BLOCK = 512
BLOCK_CHOICES = (512, 384, 256, 128)

_EMULATED: contextvars.ContextVar[bool] = contextvars.ContextVar("instructor_jax_attention_emulated", default=False)


class AttentionNotSupported(ValueError):
    """An attention implementation was asked for something it cannot run."""


@contextlib.contextmanager
def emulate_kernels_on_cpu():
    """For tests and debugging only: on any platform, pallas_tpu runs in Pallas' TPU interpreter and cudnn
    hands the arguments it builds to `jax.nn.dot_product_attention`'s xla backend instead of cuDNN. Only the
    platform checks are lifted (every other limit still refuses). Slow; it proves numerics, not speed.
    Programs traced inside it keep the emulation when called later."""
    token = _EMULATED.set(True)
    try:
        with _interpret_pallas():
            yield
    finally:
        _EMULATED.reset(token)


def emulating() -> bool:
    return _EMULATED.get()


@contextlib.contextmanager
def _interpret_pallas():
    try:
        from jax.experimental.pallas import tpu as pltpu
    except ImportError:  # this JAX has no Pallas TPU: pallas_tpu then refuses in `check`
        yield
        return
    force = getattr(pltpu, "force_tpu_interpret_mode", None)  # JAX >= 0.7; elsewhere the kernel cannot run here
    with force() if force is not None else contextlib.nullcontext():
        yield


def platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform the default backend's programs run on."""
    backend = jax.default_backend()
    return "gpu" if backend in ("cuda", "rocm", "gpu") else backend


def gpu_compute_capability() -> Optional[tuple[int, int]]:
    """(major, minor) of the first device where it is an NVIDIA GPU, else None."""
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return tuple(int(x) for x in str(capability).split(".")[:2]) if capability else None
    except ValueError:
        return None


def resolve(name: str, on: str, packed: bool) -> str:
    """The implementation `name` stands for on platform `on` for this layout: `auto` looks it up in
    MEASURED_FASTER (xla where nothing was measured); the others stand for themselves."""
    if name not in NAMES:
        raise AttentionNotSupported(f"attention must be one of {NAMES}, got {name!r}")
    if name != "auto":
        return name
    return MEASURED_FASTER.get((on, "packed" if packed else "unpacked"), "xla")


def check(implementation: str, *, on: str, dtype: str, head_dim: int, length: int, training: bool,
          attention_dropout: float, gpu_capability: Optional[tuple[int, int]] = None) -> None:
    """Refuses (AttentionNotSupported) what `implementation` cannot run, before anything is traced:
    `training` is a forward pass whose gradient may be taken (dropout on), `attention_dropout` the rate
    of dropout on the attention weights there."""
    if implementation == "xla":
        return
    if implementation == "cudnn":
        _check_cudnn(on=on, dtype=dtype, head_dim=head_dim, length=length, training=training,
                     capability=gpu_capability)
    elif implementation == "pallas_tpu":
        _check_pallas(on=on, head_dim=head_dim)
    else:
        raise AttentionNotSupported(f"unknown attention implementation {implementation!r}; one of {IMPLEMENTATIONS}")
    if training and attention_dropout > 0:
        raise AttentionNotSupported(
            f"attention={implementation!r} has no dropout on the attention weights, and this model drops them "
            f"at rate {attention_dropout} in training. Set EncoderConfig.attention_dropout_rate = 0.0 (in "
            "training: TrainConfig.attention_dropout_rate = 0.0) to keep the residual dropout and leave out this "
            "one, or use attention='xla'")


def _check_cudnn(*, on, dtype, head_dim, length, training, capability) -> None:
    if on != "gpu" and not emulating():
        raise AttentionNotSupported(f"attention='cudnn' runs on NVIDIA GPUs, not on {on}; use attention='xla'"
                                    + (" or 'pallas_tpu'" if on == "tpu" else ""))
    if dtype != "bfloat16":
        raise AttentionNotSupported(f"attention='cudnn' computes in bfloat16 (or float16, which T5 overflows), "
                                    f"not {dtype}: set dtype='bfloat16', or use attention='xla' for {dtype}")
    if capability is not None and capability < (8, 0):
        raise AttentionNotSupported(f"attention='cudnn' needs an sm80+ GPU (Ampere or later); this one is "
                                    f"sm{capability[0]}{capability[1]}: use attention='xla'")
    # Hopper and later take head dims up to 256; where the GPU is not known (emulated), Ampere's 128.
    max_head_dim = 256 if capability is not None and capability >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        raise AttentionNotSupported(f"attention='cudnn' needs a head dim (d_kv) that is a multiple of 8 and at "
                                    f"most {max_head_dim} on this GPU, got {head_dim}: use attention='xla'")
    if training and length % 2:
        raise AttentionNotSupported(f"attention='cudnn' trains with a bias only on rows of even length, got "
                                    f"{length} (choose even buckets or max_seq_length): use attention='xla'")


def _check_pallas(*, on, head_dim) -> None:
    if on != "tpu" and not emulating():
        raise AttentionNotSupported(f"attention='pallas_tpu' runs on TPUs, not on {on}; use attention='xla'"
                                    + (" or 'cudnn'" if on == "gpu" else ""))
    if flash_attention_module() is None:
        raise AttentionNotSupported("attention='pallas_tpu' needs jax.experimental.pallas.ops.tpu.flash_attention, "
                                    f"which JAX {jax.__version__} does not have: use attention='xla'")
    if head_dim > PALLAS_LANES and head_dim % PALLAS_LANES:
        raise AttentionNotSupported(f"attention='pallas_tpu' needs a head dim (d_kv) of at most {PALLAS_LANES} "
                                    f"or a multiple of it, got {head_dim}: use attention='xla'")


@functools.cache
def flash_attention_module():
    try:
        from jax.experimental.pallas.ops.tpu import flash_attention
    except ImportError:
        return None
    return flash_attention


# --------------------------------------------------------------------------------------------------------
# Once per forward pass: what every layer's attention shares.

def prepare(implementation: str, position_bias, attention_mask, segment_ids=None) -> dict:
    """The mask and bias every layer uses, in the form `implementation` takes them, from T5's position
    bias [1, heads, T, T] (float32) and the padding mask [B, T] or, for packed rows, segment ids [B, T]
    (1, 2, ... per input, 0 padding)."""
    if implementation == "xla":
        return {"bias": xla_bias(position_bias, attention_mask, segment_ids)}
    if implementation == "cudnn":
        return cudnn_inputs(position_bias, attention_mask, segment_ids)
    if implementation == "pallas_tpu":
        return pallas_inputs(position_bias, attention_mask, segment_ids)
    raise AttentionNotSupported(f"unknown attention implementation {implementation!r}")


def xla_bias(position_bias, attention_mask, segment_ids=None):
    """The position bias plus the mask as a bias: [B, heads, 1 or T, T] float32. Masked keys get the
    float32 minimum, as transformers does, so their softmax weight is exactly zero."""
    if segment_ids is None:
        allowed = attention_mask[:, None, None, :] > 0  # [B, 1, 1, k]
    else:  # block-diagonal: the own segment only. Inside it, relative distances are index distances.
        allowed = ((segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
                   & (segment_ids[:, None, None, :] > 0))  # [B, 1, q, k]
    return position_bias + jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)


def cudnn_inputs(position_bias, attention_mask, segment_ids=None) -> dict:
    """Unpacked: the shared bias [1, heads, T, T] and each row's length (the count of its mask, the tokens
    being a prefix, as the tokenizer pads on the right), no [B, heads, T, T] tensor. A padding row's
    length is taken as 1, so that no query attends to nothing (cuDNN would return NaN there). Packed: the
    bias and the segment mask [B, 1, T, T] (padding attends to padding: no row is wholly masked)."""
    if segment_ids is None:
        lengths = jnp.maximum(jnp.sum(attention_mask > 0, axis=-1, dtype=jnp.int32), 1)
        return {"bias": position_bias, "lengths": lengths}
    return {"bias": position_bias, "mask": segment_ids[:, None, :, None] == segment_ids[:, None, None, :]}


def cudnn_arguments(q, k, v, inputs: dict) -> dict:
    """The keyword arguments of `jax.nn.dot_product_attention` for q, k, v [B, T, heads, d_kv] (its own
    layout: no transpose). T5 folds 1/sqrt(d_kv) into its query weights, so the scale is 1."""
    return {"query": q, "key": k, "value": v, "bias": inputs["bias"], "mask": inputs.get("mask"),
            "scale": 1.0, "query_seq_lengths": inputs.get("lengths"), "key_value_seq_lengths": inputs.get("lengths")}


def pallas_inputs(position_bias, attention_mask, segment_ids=None) -> dict:
    """The bias broadcast to [B, heads, T', T'] (the kernel wants one per row; its gradient is summed back
    over the rows) and segment ids [B, T'] (unpacked: the mask itself, 1 real, 0 padding), T' the length
    padded to a multiple of 128 with segment 0."""
    ids = (attention_mask > 0).astype(jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    rows, length = ids.shape
    pad = padded_length(length) - length
    bias = jnp.broadcast_to(position_bias, (rows, *position_bias.shape[1:]))
    return {"ab": jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, pad))), "segment_ids": jnp.pad(ids, ((0, 0), (0, pad)))}


def padded_length(length: int) -> int:
    return -(-length // PALLAS_LANES) * PALLAS_LANES


def pallas_block(length: int) -> int:
    """The block (queries and keys alike) for rows of `length` (a multiple of 128): the whole row up to 512."""
    if length <= WHOLE_ROW_BLOCK:
        return length
    return next(b for b in BLOCK_CHOICES if length % b == 0)


# --------------------------------------------------------------------------------------------------------
# Every layer.

# Where each implementation wants the heads: q, k, v and the output are [B, T, heads, d_kv] ("blhk") or
# [B, heads, T, d_kv] ("bhlk"); the projections write that layout directly, so nothing is transposed.
LAYOUTS = {"xla": "blhk", "cudnn": "blhk", "pallas_tpu": "bhlk"}


def attend(implementation: str, q, k, v, inputs: dict, *, dtype, precision=None,
           dropout: Optional[Callable] = None, bfloat16_softmax: bool = False):
    """Attention output in LAYOUTS[implementation], from q, k, v in that layout and `prepare`'s inputs.
    `dropout` (xla only: `check` refuses it elsewhere) is applied to the attention weights.
    `bfloat16_softmax` (xla only) exponentiates and normalizes in bfloat16, max and sum in float32."""
    if implementation == "xla":
        return xla_attention(q, k, v, inputs["bias"], dtype=dtype, precision=precision, dropout=dropout,
                             bfloat16_softmax=bfloat16_softmax)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(**cudnn_arguments(q, k, v, inputs),
                                            implementation="xla" if emulating() else "cudnn")
    if implementation == "pallas_tpu":
        return pallas_attention(q, k, v, inputs["ab"], inputs["segment_ids"])
    raise AttentionNotSupported(f"unknown attention implementation {implementation!r}")


def xla_attention(q, k, v, bias, *, dtype, precision=None, dropout=None, bfloat16_softmax=False):
    """[B, T, heads, d_kv] in and out; scores in float32. T5 folds 1/sqrt(d_kv) into the query weights."""
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, precision=precision).astype(jnp.float32) + bias
    if bfloat16_softmax and dtype == jnp.bfloat16:
        weights = low_precision_softmax(scores, dtype)
    else:
        weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    if dropout is not None:
        weights = dropout(weights)
    return jnp.einsum("bhqs,bshk->bqhk", weights, v, precision=precision)


def low_precision_softmax(logits, dtype):
    """Softmax whose [.., T, T] elementwise work (subtract, exp, scale) runs in `dtype`, its statistics (the
    max and the sum) in float32: half the memory traffic of the float32 softmax in bfloat16."""
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    unnormalized = jnp.exp((logits - top).astype(dtype))
    total = jnp.sum(unnormalized, axis=-1, keepdims=True, dtype=jnp.float32)
    return unnormalized * (1.0 / total).astype(dtype)


def pallas_attention(q, k, v, ab, segment_ids):
    """[B, heads, T, d_kv] in and out, through Pallas' TPU flash attention: rows padded to ab's length
    (segment 0, which no real position attends), one block per row up to 512. On a mesh of several
    devices, each device runs the kernel on its own rows and heads (a Pallas call cannot be partitioned
    by XLA, which would otherwise gather every row onto every device)."""
    fa = flash_attention_module()
    length, padded = q.shape[2], ab.shape[-1]
    block = pallas_block(padded)
    sizes = fa.BlockSizes(block_q=block, block_k_major=block, block_k=block, block_b=1,
                          block_q_major_dkv=block, block_k_major_dkv=block, block_k_dkv=block, block_q_dkv=block,
                          block_k_major_dq=block, block_k_dq=block, block_q_dq=block)

    def kernel(q, k, v, ab, ids):
        pad = ((0, 0), (0, 0), (0, padded - length), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        out = fa.flash_attention(q, k, v, ab, fa.SegmentIds(q=ids, kv=ids), sm_scale=1.0, block_sizes=sizes)
        return out[:, :, :length]

    if emulating():  # Pallas' TPU interpreter runs one device's program; sharding is not what it tests
        return kernel(q, k, v, ab, segment_ids)
    return on_each_shard(kernel, (q, k, v, ab, segment_ids),
                         (("batch", "heads", None, None),) * 4 + (("batch", None),), ("batch", "heads", None, None))


def on_each_shard(fn, arrays, logical_in, logical_out):
    """`fn(*arrays)` run by each device on its shard, the shards those of the current mesh and logical axis
    rules (instructor_jax.runtime.sharding.activate); just `fn(*arrays)` where no mesh of several devices
    is current. Axes that do not divide evenly stay whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return fn(*arrays)

    def spec(names, shape):
        axes = nn.logical_to_mesh_axes(names)
        fitting = []
        for axis, size in zip(axes, shape):
            parts = 1
            for name in (axis if isinstance(axis, tuple) else (axis,) if axis else ()):
                parts *= mesh.shape[name]
            fitting.append(axis if size % parts == 0 else None)
        return jax.sharding.PartitionSpec(*fitting)

    in_specs = tuple(spec(n, a.shape) for n, a in zip(logical_in, arrays))
    out_spec = spec(logical_out, arrays[0].shape)
    return sharding.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_spec)(*arrays)
