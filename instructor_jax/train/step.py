"""The update step: the optimizer, embedding a batch (unpacked or packed rows), the loss and its gradient
(directly or through GradCache), and the batch layout that decides packing and bounds the compiled programs."""

from __future__ import annotations

import functools
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from instructor_jax.train import data
from instructor_jax.model import packing
from instructor_jax.model.config import InstructorConfig
from instructor_jax.train.grad_cache import grad_cache_value_and_grad
from instructor_jax.train.losses import contrastive_loss, in_batch_retrieval_accuracy
from instructor_jax.model.flops import encoder_flops, layout_cost
from instructor_jax.train.config import TrainConfig
from instructor_jax.model.encoder import InstructorModel, l2_normalize

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


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


def check_batch_splits(cfg: TrainConfig, mesh) -> None:
    """Every batch (of queries, positives and held-out texts: batch_size rows each) is split over the batch
    axis (data x fsdp); one that does not divide fails inside JAX at the first step, after the workdir and
    the programs are made. Refused before them, with the batch sizes that would fit."""
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % devices:
        lower = cfg.batch_size - cfg.batch_size % devices
        fits = f"{lower} or {lower + devices}" if lower else str(devices)
        raise ValueError(f"TrainConfig.batch_size={cfg.batch_size} does not split over the {devices} devices of the "
                         f"batch axis (mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}): choose a "
                         f"multiple of {devices}, such as {fits}, or a mesh_shape (or fewer devices) that divides "
                         f"{cfg.batch_size}")


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

