"""Contrastive training loss and in-batch retrieval accuracy for (query, positive, hard negatives) triples.

Two modes share one signature:

* ``"instructor"`` reproduces `InstructorTrainer.compute_loss` in the INSTRUCTOR reference `train.py`
  (xlang-ai/instructor-embedding), which is written as Python loops over the batch:

  - direction 1: query i scores ``[p_i, n_{j,k} for every j, k]``, target 0 (its own positive). Other
    queries' positives are deliberately *not* candidates; only the batch's hard negatives are.
  - direction 2: positive i scores ``[q_i, q_j for every j != i]``, target 0 (its own query).

  loss = mean_i CE(direction 1) + mean_i CE(direction 2). The reference has one hard negative per
  example (K = 1); here K >= 0, and with K = 0 direction 1 has a single logit, so its CE is 0.

* ``"in_batch"`` is the usual symmetric in-batch loss (t5x_retrieval, sentence-transformers'
  MultipleNegativesRankingLoss with its symmetric variant):

  - direction 1: query i scores every positive p_j and every hard negative n_{j,k}, target i.
  - direction 2: positive i scores every query q_j, target i.

Similarity is cosine divided by a temperature tau. Inputs must already be L2-normalized, so cosine is a
dot product. tau is a hyperparameter with no single right value: the reference README trains with
``--cl_temperature 0.1``, a maintainer's command in the reference's issues uses 0.01, and
sentence-transformers' default ``scale=20`` is tau = 0.05.

Everything is whole-batch matmuls (no loops over the batch), so the loss jits and can run on a batch
that is sharded over devices: pass the embeddings of the *global* batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSS_MODES = ("instructor", "in_batch")

# The logits are cosines times 1/tau (up to 100 for tau = 0.01). At the default matmul precision
# TPUs (and GPUs with TF32) round float32 inputs to bfloat16, which would move such logits by ~0.4;
# these matmuls are tiny next to the encoder, so full precision costs nothing noticeable.
_PRECISION = jax.lax.Precision.HIGHEST


def _check_temperature(temperature) -> None:
    try:
        value = float(temperature)
    except jax.errors.ConcretizationTypeError:
        return  # a traced temperature (e.g. learned) cannot be checked here
    if not value > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _check_shapes(q, p, n) -> None:
    if q.ndim != 2 or q.shape != p.shape:
        raise ValueError(f"q and p must both be [batch, dim] with the same shape, got q {q.shape} and p {p.shape}")
    if n.ndim != 3 or n.shape[0] != q.shape[0] or n.shape[2] != q.shape[1]:
        raise ValueError(f"n must be [batch, num_negatives, dim] = [{q.shape[0]}, K, {q.shape[1]}] to match "
                         f"q {q.shape}, got n {n.shape}")


def _mean_cross_entropy(logits, labels):
    # logits: [B, C]; labels: [B] int. optax's version is a stable log-softmax.
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def contrastive_loss(q, p, n, temperature, mode: str = "instructor"):
    """Contrastive loss of a global batch of L2-normalized embeddings; a float32 scalar.

    Args:
      q: [B, D] query embeddings.
      p: [B, D] positive embeddings; p[i] is the positive of q[i].
      n: [B, K, D] hard-negative embeddings, K >= 0; n[i] are the negatives drawn for q[i] (in both
        modes every query scores the negatives of the whole batch).
      temperature: tau > 0; logits are cosine / tau. See the module docstring for typical values.
      mode: "instructor" (the INSTRUCTOR reference loss) or "in_batch" (symmetric in-batch negatives).
    """
    if mode not in LOSS_MODES:
        raise ValueError(f"unknown loss mode {mode!r}; expected one of {LOSS_MODES}")
    _check_temperature(temperature)
    q, p, n = (jnp.asarray(x, jnp.float32) for x in (q, p, n))
    _check_shapes(q, p, n)
    batch, num_negatives, _ = n.shape
    inv_tau = 1.0 / jnp.asarray(temperature, jnp.float32)
    labels = jnp.arange(batch)  # [B]

    # Every query against every hard negative of the batch, flattened in (j, k) order.
    q_n = jnp.einsum("id,jkd->ijk", q, n, precision=_PRECISION).reshape(batch, batch * num_negatives)  # [B, B*K]
    # p_q[i, j] = p_i . q_j.
    p_q = jnp.einsum("id,jd->ij", p, q, precision=_PRECISION)  # [B, B]

    if mode == "instructor":
        q_p_own = jnp.einsum("id,id->i", q, p, precision=_PRECISION)  # [B]
        logits_1 = jnp.concatenate([q_p_own[:, None], q_n], axis=1) * inv_tau  # [B, 1 + B*K]
        loss_1 = _mean_cross_entropy(logits_1, jnp.zeros_like(labels))
    else:
        q_p = p_q.T  # [B, B]: q_i . p_j
        logits_1 = jnp.concatenate([q_p, q_n], axis=1) * inv_tau  # [B, B + B*K]
        loss_1 = _mean_cross_entropy(logits_1, labels)

    # Direction 2 is the same in both modes. The reference builds row i as [q_i, q_j for j != i] with
    # target 0; row i of p_q holds exactly those logits in another order with q_i at column i, and
    # softmax cross-entropy does not depend on the order of the logits, so target i over p_q gives the
    # identical value without gathers.
    loss_2 = _mean_cross_entropy(p_q * inv_tau, labels)
    return (loss_1 + loss_2).astype(jnp.float32)


def in_batch_retrieval_accuracy(q, p):
    """Fraction of queries whose most similar positive in the batch is their own: q [B, D], p [B, D].

    Ties go to the lowest index (argmax), so duplicate positives count as correct only for the first.
    """
    q, p = jnp.asarray(q, jnp.float32), jnp.asarray(p, jnp.float32)
    if q.ndim != 2 or q.shape != p.shape:
        raise ValueError(f"q and p must both be [batch, dim] with the same shape, got q {q.shape} and p {p.shape}")
    scores = jnp.einsum("id,jd->ij", q, p, precision=_PRECISION)  # [B, B]
    return jnp.mean(jnp.argmax(scores, axis=1) == jnp.arange(q.shape[0])).astype(jnp.float32)
