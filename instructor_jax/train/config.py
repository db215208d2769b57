"""`TrainConfig`: every setting of a training run (gin-configurable as `TrainConfig.*`), checked before any work."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Optional

import gin

from instructor_jax.runtime import sharding
from instructor_jax.model.config import ATTENTION_NAMES, EncoderConfig, HeadConfig
from instructor_jax.train.losses import LOSS_MODES
from instructor_jax.model.tokenization import POOLING_RULES

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


ASSETS = pathlib.Path(__file__).parents[1] / "assets"


gin.external_configurable(EncoderConfig, module="instructor_jax")


gin.external_configurable(HeadConfig, module="instructor_jax")


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, say); the last good checkpoint is left as it was."""


@gin.configurable(module="instructor_jax")
@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run. The defaults are the embedded demo (configs/tiny.gin says the same)."""

    # --- data
    train_file: str = str(ASSETS / "medi_sample" / "train.jsonl")  # MEDI .json list, .jsonl, or .array_record
    # ... or a TFDS dataset, read through tfds.data_source (random access, no TensorFlow). Build it, then bind:
    #   instructor-jax data build-tfds --input medi-data.json --data_dir /data/tfds
    #   TrainConfig.train_file = 'tfds:medi'
    #   TrainConfig.tfds_data_dir = '/data/tfds'
    tfds_data_dir: Optional[str] = None  # where tfds:NAME datasets live; None: TFDS's default (~/tensorflow_datasets)
    held_out_file: Optional[str] = str(ASSETS / "medi_sample" / "held_out.jsonl")  # None: no evaluation
    batch_size: int = 32  # global batch of (query, positive, negatives) triples, all from one task
    num_negatives: int = 1  # hard negatives per query (MEDI has one)
    skip_bad_records: bool = False  # skip and count malformed records instead of stopping
    data_seed: int = 0  # order of the single-task batches
    # --- model
    init_from: Optional[str] = None  # a checkpoint to start from (INSTRUCTOR, GTR, any T5 encoder); None: scratch
    encoder: Optional[EncoderConfig] = None  # the encoder when training from scratch (default: a tiny one)
    head: HeadConfig = HeadConfig(dense_features=64)  # pooling head when training from scratch
    tokenizer: str = str(ASSETS / "tiny_tokenizer")  # tokenizer directory when training from scratch
    max_seq_length: int = 64  # tokens per input, instruction included (the reference uses 512)
    pooling_rule: str = "instructor"  # see instructor_jax.model.tokenization
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    remat: bool = False  # recompute each layer in the backward pass: less memory, ~30% more compute
    scan_layers: bool = False  # one nn.scan over the layers: compiles several times faster for deep models
    # Attention implementation (EncoderConfig.attention, docs/attention.md): "xla" (default), "cudnn" (NVIDIA,
    # bfloat16), "pallas_tpu" (TPU) or "auto" (what the device checks measured faster; today xla everywhere).
    attention: str = "xla"
    # Dropout on the attention weights; None: the encoder's (T5: dropout_rate). The fused kernels have none:
    # training through them needs 0.0, which keeps the residual and feed-forward dropout.
    attention_dropout_rate: Optional[float] = None
    fused_qkv: bool = False  # q, k, v projections as one matmul (EncoderConfig.fused_qkv); off until measured
    bfloat16_elementwise: bool = False  # bf16 norm scaling and softmax exp, f32 statistics; off until measured
    # GradCache: embed the batch this many sequences at a time, so activation memory stays that of one
    # chunk however large the contrastive batch (one extra forward pass). None: the whole batch at once.
    # A packed batch is chunked by rows instead, this many rows at a time: a row holds at most
    # max_seq_length tokens, so a chunk never holds more tokens than an unpacked chunk at the longest bucket.
    grad_cache_chunk_size: Optional[int] = None
    # Pack each batch's query, positive and negative sequences into shared rows (instructor_jax.model.packing;
    # exact: attention stays within each sequence), so padding stops costing compute. None (default): per
    # batch, whichever layout computes fewer FLOPs, as encoding's "auto" does: on MEDI's varied lengths that
    # is packing, while a batch whose sequences all sit near one bucket's length is cheaper unpacked (no
    # padding rows, no segment pooling), and the choice costs a host-side count. True / False: always / never.
    # Compiled train steps: at most packing.training_program_bound(...) packed shapes (see make_batch_layout).
    packing: Optional[bool] = None
    # --- loss
    loss_mode: str = "instructor"  # "instructor" (the reference's loss) or "in_batch"
    temperature: float = 0.05  # tau in cos / tau (the reference ran 0.1 or 0.01; see REFERENCE.md)
    # --- optimizer: AdamW, linear warmup then linear decay to zero at total_steps
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    total_steps: int = 500
    weight_decay: float = 0.0  # never applied to norm scales or biases
    grad_clip_norm: float = 1.0  # global-norm clipping; 0 disables
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    seed: int = 0  # parameter init and dropout
    # Dropout's random bits: "threefry2x32" (JAX's default: the same masks on any mesh), or "rbg" /
    # "unsafe_rbg" (XLA's own RngBitGenerator, Philox on GPU, where threefry is computed with ordinary
    # arithmetic: cheaper where dropout masks are large; the masks may change with the mesh).
    prng_impl: str = "threefry2x32"
    # --- devices
    mesh_shape: tuple = (-1, 1, 1)  # (data, fsdp, model); -1 takes the devices left over
    # Multi-slice TPU (or GPU nodes on a slower network): (data, fsdp, model) across slices (processes where
    # devices name no slice); mesh_shape then describes one slice. None: one slice. See sharding.make_mesh.
    dcn_mesh_shape: Optional[tuple] = None
    logical_axis_rules: tuple = sharding.DEFAULT_RULES
    # --- checkpoints, logging, evaluation
    checkpoint_dir: Optional[str] = None  # default WORKDIR/checkpoints; may be a gs:// URL (orbax/tensorstore)
    save_every: int = 250  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3
    log_every: int = 10  # steps between lines in metrics.jsonl / TensorBoard
    eval_every: int = 100  # steps between held-out evaluations (and one before and one after)
    # Local mteb task directories (instructor_jax/evaluation/tasks.py; the `mteb` extra), each with its own
    # instruction, scored at every held-out evaluation on the live parameters: main scores go to
    # metrics.jsonl and TensorBoard as eval/TASK. () : none.
    eval_tasks: tuple = ()
    peak_flops_per_device: Optional[float] = None  # MFU denominator; None: measured at start-up
    export: bool = True  # write W/model (instructor-jax) and W/sentence_transformers at the end
    # Resuming a workdir with other RUN_DEFINING_FIELDS than trained its checkpoints is refused (config.gin
    # would then describe steps that ran otherwise); True goes on with the new ones, and keeps the old
    # config.gin as config.gin.before_step_N (see instructor_jax.train.workdir.record_settings).
    accept_changed_settings: bool = False

    def validate(self) -> "TrainConfig":
        """Checks every field's type and range, naming the field: a gin binding of the wrong kind fails
        here, before any compute, not deep inside the run."""
        check_field_types(self)
        for name in ("learning_rate", "weight_decay", "grad_clip_norm"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {getattr(self, name)}")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"TrainConfig.adam_eps must be positive, got {self.adam_eps}")
        if self.num_negatives < 0:
            raise ValueError(f"TrainConfig.num_negatives must be >= 0, got {self.num_negatives}")
        if self.keep_checkpoints < 1:
            raise ValueError(f"TrainConfig.keep_checkpoints must be at least 1, got {self.keep_checkpoints}")
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"TrainConfig.dtype must be 'float32' or 'bfloat16', got {self.dtype!r} "
                             "(T5 overflows in float16)")
        if self.attention not in ATTENTION_NAMES:
            raise ValueError(f"TrainConfig.attention must be one of {ATTENTION_NAMES}, got {self.attention!r}")
        if self.attention_dropout_rate is not None and not 0 <= self.attention_dropout_rate < 1:
            raise ValueError("TrainConfig.attention_dropout_rate must be None or in [0, 1), got "
                             f"{self.attention_dropout_rate}")
        if self.pooling_rule not in POOLING_RULES:
            raise ValueError(f"TrainConfig.pooling_rule must be one of {POOLING_RULES}, got {self.pooling_rule!r}")
        if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
            raise ValueError(f"TrainConfig.peak_flops_per_device must be positive, got {self.peak_flops_per_device}")
        for name in ("mesh_shape", "dcn_mesh_shape"):
            shape = getattr(self, name)
            if shape is not None and (len(shape) != 3 or not all(isinstance(n, int) and not isinstance(n, bool)
                                                                  for n in shape)):
                raise ValueError(f"TrainConfig.{name} must be three integers (data, fsdp, model), got {shape!r}")
        if self.loss_mode not in LOSS_MODES:
            raise ValueError(f"loss_mode must be one of {LOSS_MODES}, got {self.loss_mode!r}")
        if self.init_from is not None and self.encoder is not None:
            raise ValueError("both init_from and encoder are set; the checkpoint decides the encoder's shape, "
                             "so unbind TrainConfig.encoder")
        for name in ("batch_size", "total_steps", "save_every", "log_every", "eval_every", "max_seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if self.grad_cache_chunk_size is not None and (
                self.grad_cache_chunk_size < 1 or self.batch_size % self.grad_cache_chunk_size):
            raise ValueError(f"grad_cache_chunk_size must divide batch_size={self.batch_size}, "
                             f"got {self.grad_cache_chunk_size}")
        if self.prng_impl not in PRNG_IMPLS:
            raise ValueError(f"prng_impl must be one of {PRNG_IMPLS}, got {self.prng_impl!r}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.eval_tasks:
            from instructor_jax.evaluation.training import check_task_directories

            check_task_directories(self.eval_tasks)
        return self


# The settings that decide what a training step computes: the data and its order, the model, the loss and
# the optimizer with its schedule (total_steps places the decay). Changed on resume, they make the steps
# already trained those of another run. The others (devices, layouts that compute the same, logging,
# evaluation, checkpoints, exports) may change between resumes.
RUN_DEFINING_FIELDS = (
    "train_file", "batch_size", "num_negatives", "data_seed", "init_from", "encoder", "head", "tokenizer",
    "max_seq_length", "pooling_rule", "dtype", "loss_mode", "temperature", "learning_rate", "warmup_steps",
    "total_steps", "weight_decay", "grad_clip_norm", "adam_b1", "adam_b2", "adam_eps", "seed", "prng_impl",
    "attention_dropout_rate")


def _type_name(kind) -> str:
    import typing

    if typing.get_origin(kind) is typing.Union:
        return " or ".join("None" if k is type(None) else _type_name(k) for k in typing.get_args(kind))
    return {int: "an integer", float: "a number", bool: "True or False", str: "a string",
            tuple: "a tuple"}.get(kind, getattr(kind, "__name__", str(kind)))


def _is_instance(value, kind) -> bool:
    import typing

    if typing.get_origin(kind) is typing.Union:
        return any(_is_instance(value, k) for k in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list))
    return isinstance(value, kind)


def check_field_types(config) -> None:
    """Raises naming the first field of a dataclass whose value is not of its annotated type."""
    import typing

    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), hints[field.name]
        if not _is_instance(value, kind):
            raise TypeError(f"{type(config).__name__}.{field.name} must be {_type_name(kind)}, got {value!r} "
                            f"({type(value).__name__})")


def tiny_encoder() -> EncoderConfig:
    return EncoderConfig(vocab_size=356, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, dropout_rate=0.0)

