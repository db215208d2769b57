"""The one tensor table: every tensor of an INSTRUCTOR model named in each layout (PyTorch / sentence-transformers,
instructor-jax's flat t5x-style names, t5x_retrieval checkpoints), with its shape in each and the transform
between them. Reading and writing, both directions and both foreign formats, go through it, so they cannot
disagree. Transposes and reshapes only: a float32 round trip is bit-identical. numpy only, no JAX.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from instructor_jax.checkpoints.weights import WeightsError
from instructor_jax.model.config import EncoderConfig, InstructorConfig


@dataclasses.dataclass(frozen=True)
class TensorLayout:
    torch_name: str
    jax_name: str  # "/"-joined path in the Flax parameter tree
    torch_shape: tuple
    jax_shape: tuple
    to_jax: Callable[[np.ndarray], np.ndarray]
    to_torch: Callable[[np.ndarray], np.ndarray]
    # The t5x_retrieval name ("/"-joined, under the checkpoint's `target`) and shape. A t5x tensor is our
    # tensor reshaped, never transposed: flaxformer keeps attention kernels [d, heads * head_dim].
    t5x_name: Optional[str] = None
    t5x_shape: Optional[tuple] = None


def _linear(torch_name, jax_name, out_features, in_features, jax_shape, t5x_name=None):
    """torch Linear weight [out, in] <-> a Flax kernel [in, out] reshaped to `jax_shape`."""
    return TensorLayout(torch_name, jax_name, (out_features, in_features), tuple(jax_shape),
                        lambda w: np.ascontiguousarray(w.T).reshape(jax_shape),
                        lambda k: np.ascontiguousarray(k.reshape(in_features, out_features).T),
                        t5x_name, (in_features, out_features))


def _same(torch_name, jax_name, shape, t5x_name=None):
    return TensorLayout(torch_name, jax_name, shape, shape, lambda w: w, lambda w: w, t5x_name, shape)


def encoder_layout(cfg: EncoderConfig) -> list[TensorLayout]:
    d, h, k, f = cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff
    table = [
        _same("shared.weight", "encoder/token_embedder", (cfg.vocab_size, d), "token_embedder/embedding"),
        TensorLayout("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                     "encoder/relpos_bias/rel_embedding", (cfg.relative_attention_num_buckets, h),
                     (h, cfg.relative_attention_num_buckets),
                     lambda w: np.ascontiguousarray(w.T), lambda w: np.ascontiguousarray(w.T),
                     "encoder/relpos_bias/rel_embedding", (h, cfg.relative_attention_num_buckets)),
        _same("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale", (d,), "encoder/encoder_norm/scale"),
    ]
    mlp_in = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    for i in range(cfg.num_layers):
        block, layer = f"encoder.block.{i}.layer", f"encoder/layers_{i}"
        for t, j in (("q", "query"), ("k", "key"), ("v", "value")):
            table.append(_linear(f"{block}.0.SelfAttention.{t}.weight", f"{layer}/attention/{j}", h * k, d, (d, h, k),
                                 f"{layer}/attention/{j}/kernel"))
        table.append(_linear(f"{block}.0.SelfAttention.o.weight", f"{layer}/attention/out", d, h * k, (h, k, d),
                             f"{layer}/attention/out/kernel"))
        for torch_index, norm in (("0", "pre_attention_layer_norm"), ("1", "pre_mlp_layer_norm")):
            table.append(_same(f"{block}.{torch_index}.layer_norm.weight", f"{layer}/{norm}/scale", (d,),
                               f"{layer}/{norm}/scale"))
        for name in mlp_in:
            table.append(_linear(f"{block}.1.DenseReluDense.{name}.weight", f"{layer}/mlp/{name}", f, d, (d, f),
                                 f"{layer}/mlp/{name}/kernel"))
        table.append(_linear(f"{block}.1.DenseReluDense.wo.weight", f"{layer}/mlp/wo", d, f, (f, d),
                             f"{layer}/mlp/wo/kernel"))
    return table


def dense_layout(cfg: InstructorConfig) -> list[TensorLayout]:
    if cfg.head.dense_features is None:
        return []
    out, d = cfg.head.dense_features, cfg.encoder.d_model
    # t5x_retrieval's projection_layer is a DenseGeneral without bias; flaxformer names a bias "bias".
    table = [_linear("linear.weight", "dense/kernel", out, d, (d, out), "projection_layer/kernel")]
    if cfg.head.dense_bias:
        table.append(_same("linear.bias", "dense/bias", (out,), "projection_layer/bias"))
    return table


def t5x_layout(table: list[TensorLayout]) -> list[TensorLayout]:
    """`table` seen from a t5x checkpoint: each entry's t5x name and shape in place of the torch ones."""
    return [TensorLayout(t.t5x_name, t.jax_name, t.t5x_shape, t.jax_shape,
                         lambda a, s=t.jax_shape: np.ascontiguousarray(a).reshape(s),
                         lambda a, s=t.t5x_shape: np.ascontiguousarray(a).reshape(s), t.t5x_name, t.t5x_shape)
            for t in table]


def native_layout(table: list[TensorLayout]) -> list[TensorLayout]:
    """`table` seen from an instructor-jax directory: the flat names map to themselves, in the Flax shapes."""
    return [_same(t.jax_name, t.jax_name, t.jax_shape) for t in table]


def flatten_params(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "/"))
        else:
            flat[name] = value
    return flat


def unflatten_params(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        node = tree
        *parents, leaf = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def cast(array: np.ndarray, dtype: Optional[str]) -> np.ndarray:
    if dtype is None or array.dtype.name == dtype:
        return array
    import ml_dtypes  # numpy has no bfloat16; ml_dtypes (a JAX dependency) provides it.

    return array.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))


def read_table(reader, table: list[TensorLayout], source: str, dtype: Optional[str],
                ignore: Callable[[str], bool] = lambda name: False,
                hint: str = "Does config.json (num_layers, feed_forward_proj) match the weights?") -> dict[str, np.ndarray]:
    """Reads and transforms every tensor in `table`; refuses missing, extra or misshapen tensors."""
    expected = {t.torch_name for t in table}
    present = set(reader.names)
    missing = sorted(expected - present)
    if missing:
        raise WeightsError(f"{source} lacks {len(missing)} tensor(s) the config calls for: "
                           f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}. {hint}")
    extra = sorted(n for n in present - expected if not ignore(n))
    if extra:
        raise WeightsError(f"{source} holds {len(extra)} tensor(s) this model has no place for: "
                           f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}. {hint}")
    out = {}
    for entry in table:
        shape = reader.shape(entry.torch_name)
        if shape != entry.torch_shape:
            raise WeightsError(f"tensor {reader.describe(entry.torch_name)} has shape {list(shape)}; "
                               f"the config calls for {list(entry.torch_shape)}")
        out[entry.jax_name] = cast(entry.to_jax(reader.get(entry.torch_name)), dtype)
    return out
