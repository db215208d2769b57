"""The trainer: instruction-finetuned contrastive training of an INSTRUCTOR embedder, phase by phase.

    instructor-jax train --gin_file configs/tiny.gin --workdir runs/tiny [--gin_bindings 'TrainConfig.total_steps = 50']

Phases, in the order the data meets them: workdir and logging; mesh; input pipeline; model and optimizer;
shardings and initial state; the update step; checkpoint restore (workdir checkpoint, else `init_from`, else
scratch); the loop (metrics, held-out evaluation, checkpoints, preemption); the final export. A workdir that
holds a checkpoint resumes by itself, exactly: the dropout key of step s is fold_in(seed, s) and the input
iterator's position is saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import socket
import time
from typing import Optional

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.train import data, medi
from instructor_jax.runtime import fileio, host_devices, locks, sharding
from instructor_jax.model import packing
from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
from instructor_jax.train.grad_cache import grad_cache_value_and_grad
from instructor_jax.runtime.interrupts import GracefulStop, Interrupted
from instructor_jax.train.losses import LOSS_MODES, contrastive_loss, in_batch_retrieval_accuracy
from instructor_jax.model.flops import MetricWriter, encoder_flops, layout_cost, measure_matmul_peak
from instructor_jax.model import encoder as model_encoder
from instructor_jax.model.encoder import InstructorModel, init_boxed_params, l2_normalize, stack_layers, unstack_layers
from instructor_jax.model.tokenization import POOLING_RULES, InstructionTokenizer

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
        mirror.pull("metrics.jsonl")
    return staging, mirror


def weight_decay_mask(params):
    """AdamW decays matrices and embeddings only: norm scales and biases keep their values."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in ("scale", "bias"), params)


def make_optimizer(cfg: TrainConfig):
    schedule = optax.join_schedules([
        optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1)),
        optax.linear_schedule(cfg.learning_rate, 0.0, max(cfg.total_steps - cfg.warmup_steps, 1)),
    ], boundaries=[cfg.warmup_steps])
    chain = [optax.clip_by_global_norm(cfg.grad_clip_norm)] if cfg.grad_clip_norm > 0 else []
    chain.append(optax.adamw(schedule, b1=cfg.adam_b1, b2=cfg.adam_b2, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, mask=weight_decay_mask))
    return optax.chain(*chain), schedule


def model_config(cfg: TrainConfig) -> tuple[InstructorConfig, Optional[dict], pathlib.Path]:
    """(config, flat numpy params or None, tokenizer directory): from `init_from`, else from scratch."""
    numerics = {"dtype": cfg.dtype, "param_dtype": "float32", "remat": cfg.remat, "scan_layers": cfg.scan_layers}
    if cfg.init_from is not None:
        from instructor_jax.checkpoints.hub import resolve_model_path

        source = resolve_model_path(cfg.init_from)
        config, params, tokenizer_dir = convert.read_any(source, pooling_rule=cfg.pooling_rule,
                                                         pooling_rule_source="TrainConfig.pooling_rule")
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}  # float32 master weights
        if cfg.scan_layers:
            params = stack_layers(params, config.encoder.num_layers)
        # The training recipe decides sequence length and pooling: GTR, for one, pools the instruction
        # too, while INSTRUCTOR training leaves it out.
        config = config.replace(encoder=dataclasses.replace(config.encoder, **numerics),
                                max_seq_length=cfg.max_seq_length, pooling_rule=cfg.pooling_rule)
        return config, params, pathlib.Path(tokenizer_dir)
    encoder = dataclasses.replace(cfg.encoder or tiny_encoder(), **numerics).validate()
    config = InstructorConfig(encoder=encoder, head=cfg.head, max_seq_length=cfg.max_seq_length,
                              pooling_rule=cfg.pooling_rule)
    return config, None, pathlib.Path(cfg.tokenizer)


def flat_sequences(batch, prefix):
    """(ids [N, L], mask [N, L], instruction lengths [N]) of the query, pos or neg sequences of a batch."""
    ids, mask, lengths = (batch[f"{prefix}_{k}"] for k in ("ids", "mask", "instruction_lengths"))
    return ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]), lengths.reshape(-1)


def embed(model, params, batch, prefix, rng=None):
    """Embeds the query, pos or neg sequences of a batch; negatives [B, K, L] come back as [B, K, D]."""
    leading = batch[f"{prefix}_ids"].shape[:-1]
    ids, mask, lengths = flat_sequences(batch, prefix)
    if ids.shape[0] == 0:  # no hard negatives
        return jnp.zeros((*leading, model.output_dim), jnp.float32)
    kwargs = {"deterministic": True} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
    out = model.apply({"params": params}, ids, mask, lengths, **kwargs)
    return out.reshape(*leading, -1)


def is_packed(batch) -> bool:
    """Whether a batch is in the packed layout (`data.pack_batch`) rather than BatchTokenizer's."""
    return "rows_ids" in batch


def packed_rows(batch):
    """(ids, segment ids, pooling mask), each [R, L], of a packed batch."""
    return batch["rows_ids"], batch["rows_segment_ids"], batch["rows_pool_mask"]


def embed_rows(model, params, ids, segment_ids, pool_mask, rng=None):
    """Packed rows [R, L] -> embeddings [R, S, D] before the final L2 norm, segment s of row r at [r, s - 1].
    The norm waits for `gather_slots`: an unused slot's embedding is a zero vector (or the Dense bias), and
    the gradient of a norm at zero is NaN, which a zero cotangent does not cancel (0 x NaN)."""
    kwargs = {"deterministic": True} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}
    return model.apply({"params": params}, ids, segment_ids, pool_mask, packing.segments_per_row(ids.shape[1]),
                       normalize=False, method=InstructorModel.packed, **kwargs)


def gather_slots(model, rows, batch):
    """`embed_rows`' [R, S, D] -> (q [B, D], p [B, D], n [B, K, D]), each sequence's from its slot, with the
    head's final L2 norm where the model has one (as `InstructorModel._head` applies it)."""
    gathered = (rows[batch[f"{part}_slots"][..., 0], batch[f"{part}_slots"][..., 1]] for part in data.PARTS)
    return tuple(l2_normalize(x) if model.head_cfg.normalize else x for x in gathered)


def make_value_and_grad(model, cfg: TrainConfig):
    """(params, global batch, dropout key) -> ((loss, train accuracy), gradients), for a batch in either
    layout, directly or through GradCache: both layouts give the same q, p and n to the same loss."""

    def loss_of_embeddings(q, p, n):
        return contrastive_loss(q, p, n, cfg.temperature, cfg.loss_mode), in_batch_retrieval_accuracy(q, p)

    def loss_fn(params, batch, rng):
        if is_packed(batch):  # one forward pass over every row: one dropout draw
            return loss_of_embeddings(*gather_slots(model, embed_rows(model, params, *packed_rows(batch), rng), batch))
        rngs = jax.random.split(rng, 3)
        q = embed(model, params, batch, "query", rngs[0])
        p = embed(model, params, batch, "pos", rngs[1])
        n = embed(model, params, batch, "neg", rngs[2])
        return loss_of_embeddings(q, p, n)

    def cached_packed(params, batch, rng):
        """GradCache over packed rows, `grad_cache_chunk_size` rows at a time."""
        def loss(embeddings):
            return loss_of_embeddings(*gather_slots(model, embeddings["rows"], batch))

        return grad_cache_value_and_grad(functools.partial(embed_rows, model), loss, params, {"rows": packed_rows(batch)},
                                         cfg.grad_cache_chunk_size, rng)

    def cached_value_and_grad(params, batch, rng):
        """The same loss and gradients through GradCache, `grad_cache_chunk_size` sequences at a time."""
        if is_packed(batch):
            return cached_packed(params, batch, rng)
        batch_size, num_negatives, _ = batch["neg_ids"].shape
        groups = {"query": flat_sequences(batch, "query"), "pos": flat_sequences(batch, "pos")}
        if num_negatives:
            groups["neg"] = flat_sequences(batch, "neg")

        def embed_chunk(params, ids, mask, lengths, key):
            return model.apply({"params": params}, ids, mask, lengths, deterministic=False, rngs={"dropout": key})

        def loss(embeddings):
            n = (embeddings["neg"].reshape(batch_size, num_negatives, -1) if num_negatives
                 else jnp.zeros((batch_size, 0, model.output_dim), jnp.float32))
            return loss_of_embeddings(embeddings["query"], embeddings["pos"], n)

        return grad_cache_value_and_grad(embed_chunk, loss, params, groups, cfg.grad_cache_chunk_size, rng)

    if cfg.grad_cache_chunk_size:
        return cached_value_and_grad
    return jax.value_and_grad(loss_fn, has_aux=True)


def make_train_step(model, tx, schedule, cfg: TrainConfig):
    """(state, global batch) -> (state, metrics): the whole update, to be jitted with donated state."""
    base_rng = jax.random.key(cfg.seed + 1, impl=cfg.prng_impl)
    value_and_grad = make_value_and_grad(model, cfg)

    def train_step(state, batch):
        # The dropout key depends on the step alone, so a resumed run draws the same masks.
        rng = jax.random.fold_in(base_rng, state["step"])
        (loss, accuracy), grads = value_and_grad(state["params"], batch, rng)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        # A step whose loss, gradient or result is not finite never reaches the weights (nor, therefore, a
        # checkpoint): the host stops the run on seeing it.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.global_norm(params))
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_state = {"step": state["step"] + 1, "params": keep(params, state["params"]),
                     "opt_state": keep(opt_state, state["opt_state"])}
        metrics = {"loss": loss, "grad_norm": grad_norm, "train_accuracy": accuracy,
                   "learning_rate": schedule(state["step"]), "finite": finite}
        return new_state, metrics

    return train_step


def real_lengths(batch: dict) -> np.ndarray:
    """The non-padding tokens of every query, positive and negative sequence of a batch, either layout."""
    if is_packed(batch):  # segments are numbered 1, 2, ... in every row; 0 is padding
        return np.concatenate([np.bincount(row)[1:] for row in np.asarray(batch["rows_segment_ids"])])
    return np.concatenate([np.asarray(flat_sequences(batch, p)[1]).sum(-1) for p in data.PARTS])


def computed_lengths(batch: dict) -> np.ndarray:
    """The length of every row the step computes, padding included."""
    if is_packed(batch):
        rows, length = batch["rows_ids"].shape
        return np.full(rows, length)
    shapes = [flat_sequences(batch, p)[0].shape for p in data.PARTS]  # [N, L] each
    return np.concatenate([np.full(count, length) for count, length in shapes])


def batch_flops(batch: dict, config: InstructorConfig) -> float:
    """Training FLOPs of a batch (forward + backward = 3 x forward), real tokens only."""
    return 3 * encoder_flops(real_lengths(batch), config.encoder, config.head.dense_features)


STAT_KEYS = ("stat_real_tokens", "stat_slots", "stat_real_flops")  # whole-batch counts, popped before the step


def row_unit(mesh, cfg: TrainConfig) -> int:
    """Packed row counts are multiples of this: rows split evenly over the batch axis (data x fsdp), over
    the processes, and into GradCache chunks of grad_cache_chunk_size rows."""
    return math.lcm(mesh.shape["data"] * mesh.shape["fsdp"], cfg.grad_cache_chunk_size or 1, jax.process_count())


def make_batch_layout(cfg: TrainConfig, config: InstructorConfig, unit: int):
    """The input pipeline's transform of each tokenized global batch: packed (`data.pack_batch`, row counts
    multiples of `unit`) or not, as cfg.packing says, plus the whole batch's counts for the metrics (each
    process then keeps only its share of the rows, and packed rows are not all equally full).

    Every process runs it on the same global batch, so all derive the same plan. The train step compiles
    once per batch shape: packed, at most packing.training_program_bound(max_seq_length, B x (2 + K), unit)
    shapes; unpacked, at most len(buckets)^3 (see BatchTokenizer); with packing=None, at most their sum.
    """
    def cost(batch):  # every computed slot, padding included, attention weighted (metrics.layout_cost)
        return layout_cost(computed_lengths(batch), config.encoder, config.head.dense_features)

    def layout(batch: dict) -> dict:
        if cfg.packing is not False:
            packed = data.pack_batch(batch, cfg.max_seq_length, unit)
            if cfg.packing or cost(packed) < cost(batch):
                batch = packed
        counts = (real_lengths(batch).sum(), computed_lengths(batch).sum(), batch_flops(batch, config))
        return {**batch, **{k: np.asarray(v) for k, v in zip(STAT_KEYS, counts)}}

    return layout


LOCK_NAME = ".instructor-jax.lock"
EXPORTS = ("model", "sentence_transformers")


def train(workdir, cfg: Optional[TrainConfig] = None, devices=None) -> dict:
    """Runs (or resumes) training in `workdir` on `devices` (default: all, of all processes).

    Returns the held-out accuracy before and after, the final step, and the final parameters. A local
    workdir is locked (W/.instructor-jax.lock) for the run. The first Ctrl-C saves a checkpoint at the
    current step and raises `Interrupted`; a second exits at once.
    """
    cfg = (cfg or TrainConfig()).validate()
    if fileio.is_url(workdir) or jax.process_index() != 0:
        # Process 0 speaks for the job; a bucket offers no create-if-absent to lock with.
        return _train(workdir, cfg, devices)
    check_workdir(workdir)
    with locks.held(pathlib.Path(workdir) / LOCK_NAME, f"the workdir {workdir}"):
        return _train(workdir, cfg, devices)


def check_exports_replaceable(workdir: pathlib.Path) -> None:
    """Exports go to W/model and W/sentence_transformers only if those are absent or our own earlier
    exports: a workdir's `model/` may be something else (a Python package, say)."""
    for name in EXPORTS:
        try:
            fileio.check_replaceable(workdir / name, True, convert.foreign_content)
        except fileio.RefusedOverwrite as e:
            raise fileio.RefusedOverwrite(f"{e}; the run exports to {workdir / name} at the end: choose another "
                                          "--workdir, or set TrainConfig.export = False") from None


def _train(workdir, cfg: TrainConfig, devices=None) -> dict:

    # ----------------------------------------------------------------------------------------------------
    # Workdir and logging. Only process 0 writes logs and exports; checkpoints are written by all.
    # ----------------------------------------------------------------------------------------------------
    is_chief = jax.process_index() == 0
    workdir_name = str(workdir).rstrip("/")  # as the user gave it: a path or a URL
    workdir, mirror = open_workdir(workdir, is_chief)
    if is_chief and cfg.export and mirror is None:
        check_exports_replaceable(workdir)
    if is_chief:
        (workdir / "config.gin").write_text(gin.config_str() or "# defaults of instructor_jax.TrainConfig\n")

    def sync_workdir(first: bool = False) -> None:
        """Uploads new logs and exports to a URL workdir (process 0); nothing for a local one."""
        if mirror is None:
            return
        try:
            with fileio.explain_url_errors(workdir_name, "write to the workdir"):
                mirror.push()
        except OSError as e:
            if first:
                raise
            log.error("could not upload the logs (retried at the next checkpoint): %s", e)

    sync_workdir(first=True)  # a URL workdir that cannot be written fails here, before any compute

    # ----------------------------------------------------------------------------------------------------
    # Mesh.
    # ----------------------------------------------------------------------------------------------------
    # On a CPU, one device per process unless the user asked for more (see instructor_jax.runtime.host_devices).
    devices = devices if devices is not None else host_devices.training_devices()
    mesh = sharding.make_mesh(cfg.mesh_shape, devices, cfg.dcn_mesh_shape)
    rules = cfg.logical_axis_rules
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())

    # ----------------------------------------------------------------------------------------------------
    # Input pipeline: single-task batches, each process reading its rows of every global batch.
    # ----------------------------------------------------------------------------------------------------
    config, init_params, tokenizer_dir = model_config(cfg)
    tokenizer = InstructionTokenizer.from_directory(tokenizer_dir, **config.tokenizer_settings())
    train_examples = data.open_examples(cfg.train_file, skip_bad=cfg.skip_bad_records, tfds_data_dir=cfg.tfds_data_dir)
    train_iter = data.make_train_iterator(train_examples, cfg.batch_size, tokenizer, cfg.num_negatives,
                                          seed=cfg.data_seed, process_index=jax.process_index(),
                                          process_count=jax.process_count(),
                                          transform=make_batch_layout(cfg, config, row_unit(mesh, cfg)))
    held_out = []
    if cfg.held_out_file:
        held_out = data.held_out_batches(medi.read_medi(cfg.held_out_file, skip_bad=cfg.skip_bad_records),
                                         cfg.batch_size, tokenizer, num_negatives=0)

    # ----------------------------------------------------------------------------------------------------
    # Model and optimizer.
    # ----------------------------------------------------------------------------------------------------
    model = InstructorModel(config.encoder, config.head)
    tx, schedule = make_optimizer(cfg)

    # ----------------------------------------------------------------------------------------------------
    # Shardings and initial state: shapes first (eval_shape), then shardings from the logical rules,
    # then the state materialized directly on the devices it belongs to.
    # ----------------------------------------------------------------------------------------------------
    def init_state(rng):
        params = nn.unbox(init_boxed_params(model, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    rng = jax.random.PRNGKey(cfg.seed)
    with sharding.activate(mesh, rules):
        param_shardings = model_encoder.param_shardings(model, mesh, rules)
        abstract_state = jax.eval_shape(init_state, rng)
        state_shardings = {
            "step": sharding.replicated(mesh),
            "params": param_shardings,
            # Optimizer moments take their parameter's sharding; counters are replicated.
            "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract_state["opt_state"], param_shardings,
                                               transform_non_params=lambda _: sharding.replicated(mesh)),
        }
        init = jax.jit(init_state, out_shardings=state_shardings)

    # ----------------------------------------------------------------------------------------------------
    # The update step: one jitted program over the global batch, state donated.
    # ----------------------------------------------------------------------------------------------------
    train_step = make_train_step(model, tx, schedule, cfg)
    programs = [0]  # train-step programs compiled: bounded, see make_batch_layout

    def counted_train_step(state, batch):
        programs[0] += 1  # Python runs here only while tracing: this counts compilations
        return train_step(state, batch)

    def eval_step(params, batch):
        q = embed(model, params, batch, "query")
        p = embed(model, params, batch, "pos")
        return in_batch_retrieval_accuracy(q, p)

    with sharding.activate(mesh, rules):
        step_fn = jax.jit(counted_train_step, in_shardings=(state_shardings, None),
                          out_shardings=(state_shardings, None), donate_argnums=(0,))
        eval_fn = jax.jit(eval_step, in_shardings=(param_shardings, None))

    def global_batch(local: dict) -> dict:
        """This process's rows -> arrays over the whole mesh, batch axis split over data and fsdp."""
        return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, v.ndim), v)
                for k, v in local.items()}

    def evaluate(params) -> float:
        if not held_out:
            return float("nan")
        with sharding.activate(mesh, rules):
            scores = [eval_fn(params, global_batch(_local_rows(b))) for b in held_out]
        return float(np.mean([float(s) for s in scores]))

    task_evaluator = None
    if cfg.eval_tasks:
        from instructor_jax.evaluation.training import make_task_evaluator

        task_evaluator = make_task_evaluator(cfg.eval_tasks, config, tokenizer.tokenizer, mesh, rules)

    def evaluate_tasks(params, step: int) -> None:
        """eval_tasks' main scores, logged as eval/TASK (by process 0; every process takes part)."""
        if task_evaluator is None:
            return
        scores = task_evaluator(params)
        if scores is not None:
            writer.write(step, {f"eval/{name}": score for name, score in scores.items()})
            print(f"eval_tasks at step {step}: " + ", ".join(f"{n} {s:.3f}" for n, s in scores.items()), flush=True)

    # ----------------------------------------------------------------------------------------------------
    # Checkpoint restore: the workdir's own checkpoint, else init_from, else scratch.
    # ----------------------------------------------------------------------------------------------------
    # A URL (gs://...) is handed to orbax as is: it writes through tensorstore.
    checkpoint_dir = cfg.checkpoint_dir or (f"{workdir_name}/checkpoints" if fileio.is_url(workdir_name)
                                            else workdir / "checkpoints")
    manager = ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True, create=True))
    restored = None
    if manager.latest_step() is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              abstract_state, state_shardings)
        latest, restored = _restore_newest_good(manager, target, checkpoint_dir)
        state = restored["state"]
        train_iter.set_state(restored["data"])
        _truncate_metrics(workdir / "metrics.jsonl", latest, is_chief)
        log.warning("resuming from the checkpoint of step %d in %s", latest, checkpoint_dir)
    if restored is None:
        with sharding.activate(mesh, rules):
            state = init(rng)
        if init_params is not None:
            state["params"] = _place(init_params, param_shardings)
            with sharding.activate(mesh, rules):
                state["opt_state"] = jax.jit(tx.init, out_shardings=state_shardings["opt_state"])(state["params"])
            log.info("initialized from %s", cfg.init_from)

    def save(step: int, state) -> None:
        if step in manager.all_steps():
            return  # saved already at this step (by the schedule, then by a stop request)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(train_iter.get_state())), force=True)
        writer.flush()
        sync_workdir()  # the logs so far, at the checkpoints' cadence

    # ----------------------------------------------------------------------------------------------------
    # The loop.
    # ----------------------------------------------------------------------------------------------------
    writer = MetricWriter(workdir, enabled=is_chief)
    peak = cfg.peak_flops_per_device or measure_matmul_peak(cfg.dtype)
    preempted = []
    # One process: our own SIGTERM flag. Several: jax.distributed's preemption notifier owns SIGTERM and
    # reached_preemption() makes every process save at the same step; replacing its handler would let
    # one process stop alone and hang the others in a collective.
    previous_handler = (signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
                        if jax.process_count() == 1 else None)
    start_step = int(state["step"])
    accuracy_before = evaluate(state["params"])
    if held_out and is_chief:
        print(f"held-out in-batch retrieval accuracy at step {start_step}: {accuracy_before:.3f} "
              f"(chance {1 / cfg.batch_size:.3f})", flush=True)
        writer.write(start_step, {"held_out_accuracy": accuracy_before})
    evaluate_tasks(state["params"], start_step)
    progress = tqdm(total=cfg.total_steps, initial=start_step, desc="training", unit="step", disable=not is_chief,
                    mininterval=2.0)
    window = {"time": time.perf_counter(), "steps": 0, "examples": 0, "tokens": 0, "slots": 0, "flops": 0.0}
    step = start_step
    # One process: the first Ctrl-C asks the loop to save and stop. Several: Ctrl-C keeps its default, as
    # stopping one process alone would hang the others in a collective.
    stop = GracefulStop() if jax.process_count() == 1 else None
    if stop is not None:
        stop.__enter__()
    try:
        while step < cfg.total_steps:
            local = next(train_iter)
            counts = {k: local.pop(k) for k in STAT_KEYS}  # the global batch's, the same on every process
            with sharding.activate(mesh, rules):
                state, metrics = step_fn(state, global_batch(local))
            step += 1
            window["steps"] += 1
            window["examples"] += cfg.batch_size
            window["tokens"] += int(counts["stat_real_tokens"])
            window["slots"] += int(counts["stat_slots"])
            window["flops"] += float(counts["stat_real_flops"])
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                raise TrainingError(
                    f"the loss or gradient became {metrics['loss']:.3g} / {metrics['grad_norm']:.3g} at step {step}; "
                    f"stopping. The last good checkpoint (step {manager.latest_step()}) is intact: lower the "
                    "learning rate or check the data, then rerun to resume from it")
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)  # redraws only every mininterval
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                seconds = time.perf_counter() - window["time"]
                record = {k: v for k, v in metrics.items() if k != "finite"}
                # Tokens are real ones (query + pos + neg, padding excluded) whatever the layout; tokens_per_s
                # is real_tokens_per_s under its older name. padding_fraction: padded slots / slots computed.
                record.update(examples_per_s=window["examples"] / seconds, tokens_per_s=window["tokens"] / seconds,
                              real_tokens_per_s=window["tokens"] / seconds,
                              tokens_per_s_per_device=window["tokens"] / seconds / mesh.size,
                              padding_fraction=1 - window["tokens"] / window["slots"],
                              mfu=window["flops"] / seconds / (peak * mesh.size))
                writer.write(step, record)
                window = {"time": time.perf_counter(), "steps": 0, "examples": 0, "tokens": 0, "slots": 0,
                          "flops": 0.0}
            if step % cfg.eval_every == 0 and step < cfg.total_steps:
                if held_out:
                    writer.write(step, {"held_out_accuracy": evaluate(state["params"])})
                evaluate_tasks(state["params"], step)
            if step % cfg.save_every == 0 or step == cfg.total_steps:
                save(step, state)
            if preempted or manager.reached_preemption(step):
                save(step, state)
                manager.wait_until_finished()
                log.warning("preempted: saved the checkpoint of step %d; rerun the same command to resume", step)
                return {"preempted_at": step}
            if stop is not None and stop.requested:
                save(step, state)
                manager.wait_until_finished()
                raise Interrupted(f"interrupted: saved the checkpoint of step {step} in {checkpoint_dir}; rerun "
                                  "the same command to resume from it")
    finally:
        if stop is not None:
            stop.__exit__(None, None, None)
        progress.close()
        manager.wait_until_finished()
        writer.flush()
        sync_workdir()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)

    # ----------------------------------------------------------------------------------------------------
    # The end: evaluation and export.
    # ----------------------------------------------------------------------------------------------------
    accuracy_after = evaluate(state["params"])
    if held_out:
        writer.write(step, {"held_out_accuracy": accuracy_after})
        if is_chief:
            print(f"held-out in-batch retrieval accuracy at step {step}: {accuracy_after:.3f}", flush=True)
    evaluate_tasks(state["params"], step)
    writer.close()
    if cfg.export:
        _export(workdir, config, state["params"], tokenizer_dir, is_chief, shown=workdir_name)
    sync_workdir()  # the final evaluation's line and the exports
    manager.close()
    return {"held_out_accuracy_before": accuracy_before, "held_out_accuracy": accuracy_after, "step": step,
            "params": state["params"], "opt_state": state["opt_state"], "train_step_programs": programs[0]}


def _restore_newest_good(manager, target, checkpoint_dir) -> tuple[int, dict]:
    """(step, restored) of the newest checkpoint that can be restored.

    A damaged one (a crash while writing, a disk error) is reported with its step and reason and skipped
    for the one before it. It is never deleted: on a local directory and one process it is renamed
    STEP.damaged (so that saving that step again can succeed), else the run stops and says to move it.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" not in str(e):
                damaged.append((step, e))
                continue
            where = "; ".join(str(e).splitlines()[:2])  # orbax's verdict and the first differing path
            raise ValueError(f"the checkpoint of step {step} in {checkpoint_dir} does not fit this run's model "
                             f"({where[:300]}). It was written with other settings: another model or another "
                             "TrainConfig.scan_layers (stacked vs per-layer parameters). Resume with the settings "
                             "that wrote it, or start in a new workdir") from None
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            damaged.append((step, e))
            continue
        break
    else:
        reasons = "; ".join(f"step {s}: {_first_line(e)}" for s, e in damaged)
        raise TrainingError(f"no checkpoint in {checkpoint_dir} can be restored ({reasons}). Move them aside to "
                            "start over, or point TrainConfig.checkpoint_dir elsewhere")
    for bad, error in damaged:
        log.error("the checkpoint of step %d in %s cannot be restored: %s", bad, checkpoint_dir, _first_line(error))
        if fileio.is_url(checkpoint_dir) or jax.process_count() > 1:
            raise TrainingError(f"the checkpoint of step {bad} in {checkpoint_dir} cannot be restored "
                                f"({_first_line(error)}); step {step} can. Move {checkpoint_dir}/{bad} aside (it is "
                                f"not deleted automatically) and rerun to resume from step {step}")
        kept = pathlib.Path(checkpoint_dir, f"{bad}.damaged")
        while kept.exists():
            kept = kept.with_name(kept.name + "_")
        os.replace(pathlib.Path(checkpoint_dir, str(bad)), kept)
        log.warning("kept it as %s; falling back to the checkpoint of step %d", kept, step)
    if damaged:
        manager.reload()
    return step, restored


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _local_rows(batch: dict) -> dict:
    """This process's contiguous share of a global batch's rows."""
    count, index = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0]
    return {k: v[index * rows // count:(index + 1) * rows // count] for k, v in batch.items()}


def _place(flat_params: dict, shardings) -> dict:
    """Host numpy parameters (flat names) -> arrays laid out as `shardings` says, one tensor at a time."""
    flat_shardings = tensor_table.flatten_params(shardings)
    missing = set(flat_shardings) ^ set(flat_params)
    if missing:
        raise ValueError(f"the checkpoint's parameters do not match the model: {sorted(missing)[:5]}")
    return tensor_table.unflatten_params({k: jax.device_put(v, flat_shardings[k]) for k, v in flat_params.items()})


def _truncate_metrics(path: pathlib.Path, step: int, is_chief: bool) -> None:
    """Drops metric lines written after the checkpoint being resumed, which the resumed run writes again."""
    if not is_chief or not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in lines))


def _export(workdir: pathlib.Path, config: InstructorConfig, params, tokenizer_dir, is_chief: bool,
            shown: str) -> None:
    """W/model (instructor-jax) and W/sentence_transformers (PyTorch), written by process 0 only."""
    flat = tensor_table.flatten_params(sharding.gather_to_host(params))  # every process takes part
    if not is_chief:
        return
    flat = unstack_layers(flat)  # files hold one entry per layer, whatever the run's scan_layers
    export_config = config.replace(encoder=dataclasses.replace(config.encoder, dtype="float32", remat=False,
                                                               scan_layers=False))
    # Only over our own earlier exports (checked before the run too): see check_exports_replaceable.
    with fileio.atomic_directory(workdir / "model", True, convert.foreign_content) as staging:
        convert.write_native(staging, export_config, flat, tokenizer_dir)
    with fileio.atomic_directory(workdir / "sentence_transformers", True, convert.foreign_content) as staging:
        convert.write_sentence_transformers(staging, export_config, flat, tokenizer_dir)
    print(f"exported {shown}/model (instructor-jax) and {shown}/sentence_transformers "
          "(sentence-transformers / PyTorch)", flush=True)
