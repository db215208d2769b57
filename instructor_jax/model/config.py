"""Model configuration (encoder shape, head, tokenization rules) and its mapping to transformers' T5Config.

Imports no JAX, so that checkpoint conversion runs without it.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Optional

from instructor_jax.model.tokenization import POOLING_RULES

ACTIVATION_NAMES = ("relu", "gelu", "gelu_new", "gelu_pytorch_tanh", "silu", "swish")
DTYPE_NAMES = ("float32", "bfloat16")

# transformers model types whose encoder is exactly the T5 encoder built here.
SUPPORTED_MODEL_TYPES = ("t5", "mt5")
NATIVE_CONFIG = "instructor_jax.json"
# EncoderConfig fields that say how to compute, not what the checkpoint holds.
NUMERICS = ("dtype", "param_dtype", "remat", "scan_layers", "attention", "attention_dropout_rate", "fused_qkv",
            "bfloat16_elementwise")
# EncoderConfig fields added after format version 1 was first written, with their defaults: a file leaves
# them out where they are at the default, so an instructor-jax older than them still reads it.
LATER_ENCODER_DEFAULTS = {"attention": "xla", "attention_dropout_rate": None, "fused_qkv": False,
                          "bfloat16_elementwise": False}
# EncoderConfig.attention: instructor_jax.model.attention.NAMES (listed here too: this module imports no JAX).
ATTENTION_NAMES = ("auto", "xla", "cudnn", "pallas_tpu")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """A T5 encoder's shape and numerics. Field names and defaults are transformers' `T5Config`'s (the
    t5-small shape), so a field that a config.json leaves out means here what it means to transformers."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    # "relu" (T5 v1.0, GTR, INSTRUCTOR) or "gated-gelu" (T5 v1.1); any "[gated-]act" transformers accepts.
    feed_forward_proj: str = "relu"
    # Numerics, not part of the checkpoint: parameters are stored in param_dtype, matmuls run in dtype.
    dtype: str = "float32"
    param_dtype: str = "float32"
    # Recompute each layer's activations in the backward pass (saves memory in training).
    remat: bool = False
    # Run the layers as one `nn.scan` over stacked parameters (`encoder/layers/...`, leading axis "layers"):
    # XLA compiles one layer instead of num_layers copies, which cuts a 24-layer train step's compile time
    # several-fold. Checkpoint files keep one entry per layer either way (see `stack_layers`).
    scan_layers: bool = False
    # How attention is computed (instructor_jax.model.attention, docs/attention.md): "xla" (einsum + softmax,
    # the default), "cudnn" (cuDNN fused attention, NVIDIA GPUs, bfloat16), "pallas_tpu" (Pallas flash
    # attention, TPUs), or "auto" (what a device check measured faster there; today xla everywhere).
    attention: str = "xla"
    # Dropout on the attention weights in training; None: dropout_rate, as T5 does. The fused kernels have
    # none, so training through them needs 0.0 (the residual and feed-forward dropout stay at dropout_rate).
    attention_dropout_rate: Optional[float] = None
    # The query, key and value projections as one matmul (the checkpoint keeps its three kernels). Off until
    # measured on an accelerator.
    fused_qkv: bool = False
    # Under dtype bfloat16: the norms' scaling and the softmax's exp and normalization in bfloat16, their
    # statistics (mean square, max, sum) in float32. No effect in float32. Off until measured.
    bfloat16_elementwise: bool = False

    @property
    def attention_dropout(self) -> float:
        """The rate of dropout on the attention weights in training."""
        return self.dropout_rate if self.attention_dropout_rate is None else self.attention_dropout_rate

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        act = self.feed_forward_proj.split("-")[-1]
        # transformers maps "gated-gelu" to the tanh approximation for backwards compatibility.
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else act

    def validate(self) -> "EncoderConfig":
        if self.activation not in ACTIVATION_NAMES:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported; "
                             f"use 'relu', 'gated-gelu' or '[gated-]' + one of {sorted(ACTIVATION_NAMES)}")
        for name in (self.dtype, self.param_dtype):
            if name not in DTYPE_NAMES:
                raise ValueError(f"unsupported dtype {name!r}; use one of {DTYPE_NAMES} "
                                 "(T5 overflows in float16)")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"attention must be one of {ATTENTION_NAMES}, got {self.attention!r}")
        if self.attention_dropout_rate is not None and not 0 <= self.attention_dropout_rate < 1:
            raise ValueError(f"attention_dropout_rate must be None or in [0, 1), got {self.attention_dropout_rate}")
        return self


@dataclasses.dataclass(frozen=True)
class HeadConfig:
    """What follows the encoder: mean pooling over the text tokens, an optional Dense, L2 normalization."""

    # Dense output size; None when the checkpoint has no Dense module.
    dense_features: Optional[int] = 768
    dense_bias: bool = False
    normalize: bool = True


@dataclasses.dataclass(frozen=True)
class InstructorConfig:
    encoder: EncoderConfig
    head: HeadConfig
    max_seq_length: int = 512
    do_lower_case: bool = False
    # How many leading tokens the pooling leaves out; see instructor_jax.model.tokenization. "none" pools the
    # instruction too, as GTR and sentence-T5 (trained without instructions) do.
    pooling_rule: str = "instructor"
    # Named instructions carried into sentence-transformers' config_sentence_transformers.json.
    prompts: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.pooling_rule not in POOLING_RULES:
            raise ValueError(f"pooling_rule must be one of {POOLING_RULES}, got {self.pooling_rule!r}")

    def tokenizer_settings(self) -> dict:
        """Keyword arguments of `InstructionTokenizer` for this model."""
        return {"max_seq_length": self.max_seq_length, "do_lower_case": self.do_lower_case,
                "pooling_rule": self.pooling_rule}

    @property
    def output_dim(self) -> int:
        return self.head.dense_features or self.encoder.d_model

    def replace(self, **changes) -> "InstructorConfig":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict:
        data = {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}
        for name, default in LATER_ENCODER_DEFAULTS.items():  # left out at their defaults: older readers read it
            if data["encoder"][name] == default:
                del data["encoder"][name]
        return data

    @classmethod
    def from_json(cls, data: dict) -> "InstructorConfig":
        data = dict(data)
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{NATIVE_CONFIG} has format_version {version}; this instructor-jax reads "
                             f"version {FORMAT_VERSION}. Upgrade instructor-jax or re-convert the model")
        return cls(encoder=EncoderConfig(**data.pop("encoder")).validate(), head=HeadConfig(**data.pop("head")),
                   **data)

    def save(self, directory) -> None:
        pathlib.Path(directory, NATIVE_CONFIG).write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory) -> "InstructorConfig":
        path = pathlib.Path(directory, NATIVE_CONFIG)
        try:
            return cls.from_json(json.loads(path.read_text()))
        except (TypeError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not a valid instructor-jax config: {e}") from e


def encoder_config_from_t5(t5: dict, source: str = "config.json", **numerics) -> EncoderConfig:
    """EncoderConfig from a transformers T5Config dict; unknown architectures are refused by name."""
    model_type = t5.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"{source}: model_type {model_type!r} (architectures {t5.get('architectures')}) is not "
                         f"supported; instructor-jax loads T5 encoders ({', '.join(SUPPORTED_MODEL_TYPES)})")
    fields = {f.name for f in dataclasses.fields(EncoderConfig)} - set(NUMERICS)
    values = {k: t5[k] for k in fields if k in t5}
    missing = {"d_model", "num_layers", "num_heads", "d_kv", "d_ff", "vocab_size"} - set(values)
    if missing:
        raise ValueError(f"{source} lacks {sorted(missing)}, which a T5 config must give")
    try:
        return EncoderConfig(**values, **numerics).validate()
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from e


def t5_config_from_encoder(cfg: EncoderConfig) -> dict:
    """A config.json that transformers loads as T5Config for `T5EncoderModel`."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "d_kv": cfg.d_kv,
        "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_heads": cfg.num_heads,
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
        "dropout_rate": cfg.dropout_rate,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "feed_forward_proj": cfg.feed_forward_proj,
        "initializer_factor": 1.0,
        "is_encoder_decoder": False,
        "tie_word_embeddings": True,
        "use_cache": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "decoder_start_token_id": 0,
        "dtype": cfg.param_dtype,
    }


def tiny_config(feed_forward_proj: str = "relu", num_layers: int = 2, num_heads: int = 4,
                vocab_size: int = 356, d_model: int = 32, dense_features: Optional[int] = 16,
                max_seq_length: int = 64, pooling_rule: str = "instructor") -> InstructorConfig:
    """A model small enough for tests and the demo (vocab sized for the bundled tiny tokenizer)."""
    return InstructorConfig(
        encoder=EncoderConfig(vocab_size=vocab_size, d_model=d_model, d_kv=8, d_ff=2 * d_model,
                              num_layers=num_layers, num_heads=num_heads, feed_forward_proj=feed_forward_proj),
        head=HeadConfig(dense_features=dense_features),
        max_seq_length=max_seq_length, pooling_rule=pooling_rule)
