"""The T5 encoder and the INSTRUCTOR head, in Flax Linen.

Computes what transformers' `T5EncoderModel` followed by sentence-transformers' `Pooling`
(mean over the text tokens, `include_prompt=False`), `Dense` and `Normalize` compute: T5's pre-norm
layers with RMSNorm and no biases, the relative position bias computed by the first layer and shared by all,
and attention logits unscaled (T5 folds the 1/sqrt(d_kv) into its initialization).
Parameters live in a t5x-style tree (`token_embedder/embedding`, `encoder/layers_3/attention/query/kernel`,
...) and every parameter and main activation carries logical axis names, so a mesh can shard it by rules
(`instructor_jax.runtime.sharding`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from instructor_jax.model import attention
from instructor_jax.model.config import EncoderConfig, HeadConfig
from instructor_jax.runtime import sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtype_from_name(name: str) -> Any:
    return DTYPES[name]  # EncoderConfig.validate has checked the name


ACTIVATIONS = {  # keys: config.ACTIVATION_NAMES
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def _param(module: nn.Module, name: str, init, shape, axes, cfg: EncoderConfig):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                        dtype_from_name(cfg.param_dtype))


def matmul_precision(cfg: EncoderConfig):
    """float32 means float32: full-precision matmuls, where GPUs would otherwise round inputs to TF32
    (measured on an H200: 2.8e-4 from sentence-transformers instead of ~1e-7). bfloat16 is the fast mode."""
    return jax.lax.Precision.HIGHEST if cfg.dtype == "float32" else jax.lax.Precision.DEFAULT


def _constrain(x, axes):
    # A no-op unless a mesh and logical axis rules are active (see instructor_jax.runtime.sharding).
    return nn.with_logical_constraint(x, axes)


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean subtraction, statistics in float32."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x):
        scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",), self.cfg)
        dtype = dtype_from_name(self.cfg.dtype)
        if self.cfg.bfloat16_elementwise and self.cfg.dtype == "bfloat16":
            # The statistic in float32, the [B, L, d_model] scaling in bfloat16 (half the memory traffic).
            mean_square = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
            return x.astype(dtype) * jax.lax.rsqrt(mean_square + self.cfg.layer_norm_epsilon).astype(dtype) \
                * scale.astype(dtype)
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.cfg.layer_norm_epsilon)
        return x32.astype(dtype) * scale.astype(dtype)


def relative_position_buckets(query_length: int, key_length: int, num_buckets: int, max_distance: int):
    """Bidirectional T5 buckets, [q, k] int32 (transformers' `_relative_position_bucket`).

    Computed with numpy at trace time: it depends only on static shapes, so it becomes a constant.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int32) * num_buckets
    relative = np.abs(relative)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    # np.maximum only keeps log() finite where the is_small branch is taken anyway.
    large = max_exact + (np.log(np.maximum(relative, 1).astype(np.float32) / max_exact)
                         / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int32)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, relative, large).astype(np.int32)


class RelativePositionBias(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, length: int):
        cfg = self.cfg
        table = _param(self, "rel_embedding", nn.initializers.normal(1.0),
                       (cfg.num_heads, cfg.relative_attention_num_buckets), ("heads", "relpos_buckets"), cfg)
        buckets = relative_position_buckets(length, length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        return jnp.take(table.astype(jnp.float32), buckets, axis=1)[None]  # [1, heads, q, k]


class SelfAttention(nn.Module):
    """Multi-head self-attention; `attention_inputs` come from `attention.prepare` (once per forward), and
    `implementation` is a resolved name (`attention.IMPLEMENTATIONS`)."""

    cfg: EncoderConfig
    implementation: str = "xla"

    @nn.compact
    def __call__(self, x, attention_inputs, deterministic: bool, dropout_key=None):
        cfg = self.cfg
        dtype = dtype_from_name(cfg.dtype)
        init = nn.initializers.normal((cfg.d_model * cfg.d_kv) ** -0.5)
        qkv_shape = (cfg.d_model, cfg.num_heads, cfg.d_kv)
        qkv_axes = ("embed", "heads", "kv")
        precision = matmul_precision(cfg)
        layout = attention.LAYOUTS[self.implementation]  # "blhk" or "bhlk": the projections write it directly
        names = ("query", "key", "value")

        def kernel(name):
            return _param(self, name, init, qkv_shape, qkv_axes, cfg).astype(dtype)

        if cfg.fused_qkv:
            # One matmul for the three projections. The checkpoint keeps three kernels: they are stacked at use,
            # on a new axis so that each keeps its heads' sharding.
            q, k, v = jnp.einsum(f"bld,dthk->t{layout}", x, jnp.stack([kernel(n) for n in names], axis=1),
                                 precision=precision)
        else:
            q, k, v = (jnp.einsum(f"bld,dhk->{layout}", x, kernel(n), precision=precision) for n in names)
        axes = {"b": "batch", "l": "length", "h": "heads", "k": "kv"}
        q = _constrain(q, tuple(axes[c] for c in layout))
        rate = cfg.attention_dropout
        out = attention.attend(
            self.implementation, q, k, v, attention_inputs, dtype=dtype, precision=precision,
            dropout=lambda w: nn.Dropout(rate)(w, deterministic=deterministic, rng=dropout_key),
            bfloat16_softmax=cfg.bfloat16_elementwise)
        out_kernel = _param(self, "out", nn.initializers.normal((cfg.num_heads * cfg.d_kv) ** -0.5),
                            (cfg.num_heads, cfg.d_kv, cfg.d_model), ("heads", "kv", "embed"), cfg)
        return jnp.einsum(f"{layout},hkd->bld", out, out_kernel.astype(dtype), precision=precision)


class MLP(nn.Module):
    cfg: EncoderConfig

    @nn.compact
    def __call__(self, x, deterministic: bool, dropout_key=None):
        cfg = self.cfg
        dtype = dtype_from_name(cfg.dtype)
        wi_init = nn.initializers.normal(cfg.d_model ** -0.5)
        names = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
        precision = matmul_precision(cfg)
        hidden = [jnp.matmul(x, _param(self, n, wi_init, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg).astype(dtype),
                             precision=precision)
                  for n in names]
        h = ACTIVATIONS[cfg.activation](hidden[0])
        if cfg.is_gated:
            h = h * hidden[1]
        h = _constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic, rng=dropout_key)
        wo = _param(self, "wo", nn.initializers.normal(cfg.d_ff ** -0.5), (cfg.d_ff, cfg.d_model), ("mlp", "embed"), cfg)
        return jnp.matmul(h, wo.astype(dtype), precision=precision)


class EncoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    `dropout_key` is this layer's own key (None when deterministic): passing it explicitly, rather than
    letting each Dropout draw from the module path, gives the same masks with and without `scan_layers`.
    Under `scan_layers` it returns (x, None), the (carry, output) pair `nn.scan` wants."""

    cfg: EncoderConfig
    attention: str = "xla"  # the resolved implementation (attention.IMPLEMENTATIONS)

    @nn.compact
    def __call__(self, x, attention_inputs, dropout_key, deterministic: bool):
        keys = [None] * 4 if dropout_key is None else list(jax.random.split(dropout_key, 4))
        dropout = nn.Dropout(self.cfg.dropout_rate)
        h = SelfAttention(self.cfg, self.attention, name="attention")(
            RMSNorm(self.cfg, name="pre_attention_layer_norm")(x), attention_inputs, deterministic, keys[0])
        x = x + dropout(h, deterministic=deterministic, rng=keys[1])
        h = MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="pre_mlp_layer_norm")(x), deterministic, keys[2])
        x = x + dropout(h, deterministic=deterministic, rng=keys[3])
        x = _constrain(x, ("batch", "length", "embed"))
        return (x, None) if self.cfg.scan_layers else x


def attention_implementation(cfg: EncoderConfig, length: int, deterministic: bool, packed: bool) -> str:
    """The attention implementation `cfg.attention` stands for here, checked: an implementation that cannot
    run this (platform, dtype, head dim, length, dropout) is refused with the limit and what can."""
    on = attention.platform()
    implementation = attention.resolve(cfg.attention, on, packed)
    attention.check(implementation, on=on, dtype=cfg.dtype, head_dim=cfg.d_kv, length=length,
                    training=not deterministic, attention_dropout=cfg.attention_dropout,
                    gpu_capability=attention.gpu_compute_capability() if on == "gpu" else None)
    return implementation


class T5Encoder(nn.Module):
    """Token ids [B, L] and attention mask [B, L] -> final hidden states [B, L, d_model].

    With `segment_ids` [B, L] (packed rows: 1, 2, ... per input, 0 padding), a position attends only to
    its own segment; the attention mask is then ignored."""

    cfg: EncoderConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True, segment_ids=None):
        cfg = self.cfg
        dtype = dtype_from_name(cfg.dtype)
        embedding = _param(self, "token_embedder", nn.initializers.normal(1.0),
                           (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        # The table's embed axis is gathered first (FSDP does this for every weight before use): looking rows
        # up in a table split along embed gives rows split along embed, which XLA can only turn into
        # batch-split rows by materializing the whole global batch's embeddings on every device.
        embedding = _constrain(embedding, ("vocab", None))
        x = jnp.take(embedding, input_ids, axis=0).astype(dtype)  # T5 does not scale embeddings.
        x = _constrain(x, ("batch", "length", "embed"))
        dropout = nn.Dropout(cfg.dropout_rate)
        x = dropout(x, deterministic=deterministic)

        # One position bias for all layers (held by block 0 in transformers); with the padding mask or the
        # segments, in the form the attention implementation takes, made here once for every layer.
        position_bias = RelativePositionBias(cfg, name="relpos_bias")(input_ids.shape[1])
        implementation = attention_implementation(cfg, input_ids.shape[1], deterministic, segment_ids is not None)
        attention_inputs = attention.prepare(implementation, position_bias, attention_mask, segment_ids)

        # Layer i's dropout key is split from one draw, the same in both layouts.
        layer_keys = None if deterministic else jax.random.split(self.make_rng("dropout"), cfg.num_layers)
        layer_cls = EncoderLayer
        if cfg.remat:
            # Inside a scan, CSE cannot merge the recomputation into the forward pass, so its guard is not needed.
            layer_cls = nn.remat(layer_cls, static_argnums=(4,), prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            # Parameters are split along the scan but not initialized by it: `init_boxed_params` builds them
            # in the unrolled layout and stacks them, so a seed gives the same model in both layouts.
            scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, implementation, name="layers")(x, attention_inputs, layer_keys, deterministic)
        else:
            for i in range(cfg.num_layers):
                x = layer_cls(cfg, implementation, name=f"layers_{i}")(
                    x, attention_inputs, None if layer_keys is None else layer_keys[i], deterministic)
        x = RMSNorm(cfg, name="encoder_norm")(x)
        return dropout(x, deterministic=deterministic)


def text_token_mask(attention_mask, instruction_length):
    """Pooling mask: real tokens after the first `instruction_length` positions ([B, L] float32)."""
    positions = jnp.arange(attention_mask.shape[1])[None, :]
    return ((attention_mask > 0) & (positions >= instruction_length[:, None])).astype(jnp.float32)


def mean_pool(hidden, pool_mask):
    """Mean over masked positions in float32; the 1e-9 floor matches sentence-transformers."""
    summed = jnp.einsum("bld,bl->bd", hidden.astype(jnp.float32), pool_mask, precision=jax.lax.Precision.HIGHEST)
    return summed / jnp.maximum(pool_mask.sum(axis=1, keepdims=True), 1e-9)


def segment_mean_pool(hidden, segment_ids, pool_mask, max_segments: int):
    """Per-segment means of a packed row over its masked positions: [R, L, D] -> [R, max_segments, D]."""
    one_hot = (segment_ids[:, :, None] == jnp.arange(1, max_segments + 1)[None, None, :]).astype(jnp.float32)
    weights = one_hot * pool_mask[:, :, None].astype(jnp.float32)  # [R, L, S]
    summed = jnp.einsum("rld,rls->rsd", hidden.astype(jnp.float32), weights, precision=jax.lax.Precision.HIGHEST)
    return summed / jnp.maximum(weights.sum(axis=1)[..., None], 1e-9)


def l2_normalize(x):
    # torch.nn.functional.normalize: x / max(||x||, 1e-12).
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class InstructorModel(nn.Module):
    """Encoder, mean pooling over text tokens only, Dense, L2 norm: [B, L] ids -> [B, dim] float32."""

    encoder_cfg: EncoderConfig
    head_cfg: HeadConfig

    def setup(self):
        self.encoder = T5Encoder(self.encoder_cfg)
        if self.head_cfg.dense_features is not None:
            self.dense = nn.Dense(
                self.head_cfg.dense_features, use_bias=self.head_cfg.dense_bias, dtype=jnp.float32,
                precision=jax.lax.Precision.HIGHEST,
                param_dtype=dtype_from_name(self.encoder_cfg.param_dtype),
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "dense")),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("dense",)))

    def __call__(self, input_ids, attention_mask, instruction_length, deterministic: bool = True,
                 normalize: bool = True):
        """`normalize=False` skips the final L2 norm even where the checkpoint has one."""
        hidden = self.encoder(input_ids, attention_mask, deterministic)
        pooled = mean_pool(hidden, text_token_mask(attention_mask, instruction_length))
        return self._head(_constrain(pooled, ("batch", "embed")), normalize)

    def packed(self, input_ids, segment_ids, pool_mask, max_segments: int, deterministic: bool = True,
               normalize: bool = True):
        """Packed rows (see instructor_jax.model.packing) -> [R, max_segments, dim]: segment s's embedding at [r, s-1],
        equal to what the unpacked call gives its input alone (up to float rounding)."""
        hidden = self.encoder(input_ids, segment_ids > 0, deterministic, segment_ids=segment_ids)
        pooled = segment_mean_pool(hidden, segment_ids, pool_mask, max_segments)
        return self._head(_constrain(pooled, ("batch", None, "embed")), normalize)

    def _head(self, pooled, normalize: bool):
        if self.head_cfg.dense_features is not None:
            pooled = self.dense(pooled)
        return l2_normalize(pooled) if self.head_cfg.normalize and normalize else pooled

    @property
    def output_dim(self) -> int:
        return self.head_cfg.dense_features or self.encoder_cfg.d_model


LAYER_PATTERN = re.compile(r"^encoder/layers_(\d+)/(.+)$")
STACKED_PREFIX = "encoder/layers/"


def _stack_arrays(arrays: list) -> np.ndarray:
    return np.stack([np.asarray(a) for a in arrays])


def _stack_boxed(boxes: list) -> nn.Partitioned:
    """Stacks `nn.Partitioned` leaves (traced or not), naming the new leading axis as nn.scan would."""
    return boxes[0].replace_boxed(jnp.stack([b.unbox() for b in boxes])).replace(
        names=("layers", *boxes[0].names))


def stack_layers(flat: dict, num_layers: int, stack=_stack_arrays) -> dict:
    """Flat parameters with one entry per layer (`encoder/layers_3/...`, the layout of every checkpoint
    file) -> the `scan_layers` layout (`encoder/layers/...`, layer index leading). numpy in, numpy out,
    unless `stack` (a list of per-layer leaves -> one stacked leaf) says otherwise."""
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    out = {}
    for name, value in flat.items():
        match = LAYER_PATTERN.match(name)
        if match:
            per_layer.setdefault(match.group(2), {})[int(match.group(1))] = value
        else:
            out[name] = value
    for rest, layers in per_layer.items():
        if sorted(layers) != list(range(num_layers)):
            raise ValueError(f"encoder/layers_*/{rest}: expected layers 0..{num_layers - 1}, got {sorted(layers)}")
        out[STACKED_PREFIX + rest] = stack([layers[i] for i in range(num_layers)])
    return out


def unstack_layers(flat: dict) -> dict:
    """The inverse of `stack_layers`; flat parameters without stacked entries pass through unchanged."""
    out = {}
    for name, value in flat.items():
        if name.startswith(STACKED_PREFIX):
            for i, layer in enumerate(np.asarray(value)):
                out[f"encoder/layers_{i}/{name[len(STACKED_PREFIX):]}"] = layer
        else:
            out[name] = value
    return out


def init_boxed_params(model: InstructorModel, rng):
    """Random parameters still in their `nn.Partitioned` boxes, which carry the logical axis names: under
    `jax.eval_shape` the source of sharding specs, under a jit with out_shardings a sharded init.

    `scan_layers` is a compute layout, not a different model: its parameters are the unrolled model's,
    drawn with the same keys, then stacked."""
    cfg = model.encoder_cfg
    if cfg.scan_layers:
        unrolled = InstructorModel(dataclasses.replace(cfg, scan_layers=False), model.head_cfg)
        flat = traverse_util.flatten_dict(init_boxed_params(unrolled, rng), sep="/")
        return traverse_util.unflatten_dict(stack_layers(flat, cfg.num_layers, stack=_stack_boxed), sep="/")
    if cfg.attention != "xla":  # the same parameters whatever the attention: init where any platform can
        return init_boxed_params(InstructorModel(dataclasses.replace(cfg, attention="xla"), model.head_cfg), rng)
    ids = jnp.ones((1, 8), jnp.int32)
    return model.init(rng, ids, ids, jnp.zeros((1,), jnp.int32))["params"]


def init_params(encoder_cfg: EncoderConfig, head_cfg: HeadConfig, seed: int = 0):
    """Random parameters (unboxed) on the default device."""
    return nn.unbox(init_boxed_params(InstructorModel(encoder_cfg, head_cfg), jax.random.PRNGKey(seed)))


def param_shardings(module, mesh, rules=sharding.DEFAULT_RULES):
    """NamedShardings of an `InstructorModel`'s parameters on `mesh`, from their logical axis names (shapes
    only: nothing is initialized)."""
    with sharding.activate(mesh, rules):
        boxed = jax.eval_shape(lambda key: init_boxed_params(module, key), jax.random.PRNGKey(0))
        return sharding.logical_shardings(boxed, mesh, rules)
