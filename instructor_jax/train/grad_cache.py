"""GradCache: contrastive batches larger than activation memory allows (Gao et al., 2021).

A contrastive loss couples every embedding of the batch, so the batch cannot simply be split into
micro-batches with accumulated gradients. GradCache splits the work instead:
  1. embed the whole batch chunk by chunk without keeping activations (a `lax.map`, no gradient);
  2. take the loss and its gradient with respect to the embeddings only (cheap: [B, D] tensors);
  3. re-run each chunk's forward pass under `jax.vjp` and pull its embedding gradient back to the
     parameters, accumulating over chunks in a `lax.scan`.
Peak activation memory is that of one chunk, whatever the batch size; the price is one extra forward
pass. The gradients equal the direct ones (up to float rounding) when the forward pass is deterministic
given its key: each chunk uses the same dropout key in steps 1 and 3.

Chunk c holds rows c, c + n, c + 2n, ... of a group of n chunks, so that with the batch sharded over
devices in contiguous blocks every chunk still spans all devices.
"""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def to_chunks(x, chunk_size: int):
    """[N, ...] -> [N / chunk_size, chunk_size, ...], chunk c holding rows c, c + n, c + 2n, ..."""
    rows = x.shape[0]
    if rows % chunk_size:
        raise ValueError(f"{rows} sequences do not split into chunks of {chunk_size}; choose a chunk size "
                         "that divides the batch (and batch x num_negatives)")
    num_chunks = rows // chunk_size
    chunked = jnp.swapaxes(x.reshape(chunk_size, num_chunks, *x.shape[1:]), 0, 1)
    return nn.with_logical_constraint(chunked, (None, "batch") + (None,) * (x.ndim - 1))


def from_chunks(x):
    """Inverse of `to_chunks`."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def grad_cache_value_and_grad(embed: Callable, loss: Callable, params, groups: dict, chunk_size: int, rng):
    """((loss, aux), grads) of `loss(embeddings)` where embeddings[g] = embed(params, *groups[g], key).

    embed(params, *arrays, key) -> [rows, ...] embeds one chunk of a group's arrays; `groups` maps a name
    to its arrays, all with N leading rows: (ids [N, L], mask [N, L], instruction_lengths [N]) for
    sequences, or (ids, segment_ids, pool_mask [N, L]) for packed rows, whose embeddings are [N, S, dim];
    `loss(dict name -> embeddings)` returns (scalar, aux). Each group is chunked separately (their lengths
    differ).
    """
    chunked = {name: tuple(to_chunks(a, chunk_size) for a in arrays) for name, arrays in groups.items()}
    keys = {name: jax.random.split(jax.random.fold_in(rng, i), chunked[name][0].shape[0])
            for i, name in enumerate(sorted(groups))}

    # 1. Embeddings without activations: lax.map runs the chunks one after another.
    embeddings = {
        name: from_chunks(jax.lax.map(lambda xs: embed(params, *xs), (*chunked[name], keys[name])))
        for name in groups}
    embeddings = jax.lax.stop_gradient(embeddings)

    # 2. The loss and its gradient with respect to the embeddings.
    (value, aux), embedding_grads = jax.value_and_grad(loss, has_aux=True)(embeddings)

    # 3. Each chunk again, its embedding gradient pulled back to the parameters.
    def accumulate(grads, xs):
        *inputs, key, cotangent = xs
        _, pullback = jax.vjp(lambda p: embed(p, *inputs, key), params)
        return jax.tree.map(jnp.add, grads, pullback(cotangent)[0]), None

    grads = jax.tree.map(jnp.zeros_like, params)
    for name in sorted(groups):
        cotangents = to_chunks(embedding_grads[name], chunk_size)
        grads, _ = jax.lax.scan(accumulate, grads, (*chunked[name], keys[name], cotangents))
    return (value, aux), grads
