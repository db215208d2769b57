"""The contrastive losses against independent PyTorch loop versions (the INSTRUCTOR train.py formulation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instructor_jax.train.losses import contrastive_loss, in_batch_retrieval_accuracy

DIM = 16
TEMPERATURES = (0.01, 0.05, 0.1)

# Jitted once per (shape, mode), with the temperature traced: far fewer compilations than eager mode.
_loss_and_grads = jax.jit(jax.value_and_grad(contrastive_loss, argnums=(0, 1, 2)), static_argnames=("mode",))


def _unit_vectors(rng, *shape):
    """Random L2-normalized vectors, drawn and normalized in float64, returned as float32."""
    x = rng.standard_normal((*shape, DIM))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _inputs(batch, negatives, seed=0):
    rng = np.random.default_rng(seed)
    return _unit_vectors(rng, batch), _unit_vectors(rng, batch), _unit_vectors(rng, batch, negatives)


def _cos(a, b):
    return F.cosine_similarity(a.unsqueeze(0), b.unsqueeze(0), dim=-1)  # [1]


def torch_instructor_loss(q, p, n, temperature):
    """INSTRUCTOR train.py's compute_loss, loop for loop, generalized to K negatives per example."""
    batch, num_negatives = n.shape[:2]
    rows = []
    for i in range(batch):  # direction 1: [its positive] + [every hard negative of the batch]
        scores = [_cos(q[i], p[i])] + [_cos(q[i], n[j, k]) for j in range(batch) for k in range(num_negatives)]
        rows.append(torch.cat(scores) / temperature)
    loss = F.cross_entropy(torch.stack(rows), torch.zeros(batch, dtype=torch.long))
    rows = []
    for i in range(batch):  # direction 2: [its query] + [every other query]
        scores = [_cos(p[i], q[i])] + [_cos(p[i], q[j]) for j in range(batch) if j != i]
        rows.append(torch.cat(scores) / temperature)
    return loss + F.cross_entropy(torch.stack(rows), torch.zeros(batch, dtype=torch.long))


def torch_in_batch_loss(q, p, n, temperature):
    """Symmetric in-batch negatives (MultipleNegativesRankingLoss style), one row per loop step."""
    batch, num_negatives = n.shape[:2]
    labels = torch.arange(batch)
    rows = []
    for i in range(batch):  # direction 1: every positive, then every hard negative; target i
        scores = [_cos(q[i], p[j]) for j in range(batch)]
        scores += [_cos(q[i], n[j, k]) for j in range(batch) for k in range(num_negatives)]
        rows.append(torch.cat(scores) / temperature)
    loss = F.cross_entropy(torch.stack(rows), labels)
    rows = [torch.cat([_cos(p[i], q[j]) for j in range(batch)]) / temperature for i in range(batch)]
    return loss + F.cross_entropy(torch.stack(rows), labels)  # direction 2: every query; target i


TORCH_LOSSES = {"instructor": torch_instructor_loss, "in_batch": torch_in_batch_loss}


def _torch_value_and_grads(mode, arrays, temperature, prepare=lambda x: x):
    leaves = [torch.tensor(x, requires_grad=True) for x in arrays]
    loss = TORCH_LOSSES[mode](*(prepare(x) for x in leaves), temperature)
    loss.backward()
    # n gets no gradient at all when K == 0 (it never enters the loss).
    return loss.item(), [np.zeros(x.shape, np.float32) if x.grad is None else x.grad.numpy() for x in leaves]


def _tangent(grad, x):
    """The component of grad orthogonal to the unit vector x (per vector along the last axis)."""
    return grad - np.sum(grad * x, axis=-1, keepdims=True) * x


def _assert_grads_close(ours, theirs):
    # Gradients scale like 1/tau; compare at 1e-5 relative to each gradient's largest entry.
    for a, b in zip(ours, theirs):
        scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("mode", ["instructor", "in_batch"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("negatives", [0, 1, 3])
@pytest.mark.parametrize("batch", [1, 4, 7])
def test_loss_and_grads_match_torch(mode, temperature, negatives, batch):
    q, p, n = _inputs(batch, negatives, seed=batch * 10 + negatives)
    loss, grads = _loss_and_grads(q, p, n, temperature, mode=mode)
    ref_loss, ref_grads = _torch_value_and_grads(mode, (q, p, n), temperature)

    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    # torch's cosine_similarity normalizes its inputs, so its gradient has no component along each
    # (unit) input vector while the dot product's does; on the unit sphere only the tangent part
    # matters, and the raw-vector test below compares full gradients.
    _assert_grads_close([_tangent(np.asarray(g), x) for g, x in zip(grads, (q, p, n))],
                        [_tangent(g, x) for g, x in zip(ref_grads, (q, p, n))])


@pytest.mark.parametrize("mode", ["instructor", "in_batch"])
def test_grads_wrt_raw_vectors_match_torch(mode):
    # Training differentiates through the normalization of the encoder's pooled output.
    rng = np.random.default_rng(7)
    raw = [(3.0 * rng.standard_normal(shape)).astype(np.float32) for shape in ((5, DIM), (5, DIM), (5, 2, DIM))]

    def jax_loss(q, p, n):
        normalize = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # noqa: E731
        return contrastive_loss(normalize(q), normalize(p), normalize(n), 0.05, mode)

    loss, grads = jax.value_and_grad(jax_loss, argnums=(0, 1, 2))(*raw)
    ref_loss, ref_grads = _torch_value_and_grads(
        mode, raw, 0.05, prepare=lambda x: x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-5)
    _assert_grads_close(grads, ref_grads)


def test_jit_matches_eager():
    q, p, n = _inputs(6, 2)
    for mode in ("instructor", "in_batch"):
        jitted = jax.jit(contrastive_loss, static_argnames=("mode",))
        np.testing.assert_allclose(jitted(q, p, n, 0.05, mode=mode), contrastive_loss(q, p, n, 0.05, mode),
                                   rtol=1e-6)
    # A traced temperature (e.g. a learned one) is accepted too.
    np.testing.assert_allclose(jax.jit(contrastive_loss)(q, p, n, 0.05), contrastive_loss(q, p, n, 0.05), rtol=1e-6)


def test_modes_differ_only_with_other_examples():
    q, p, n = _inputs(4, 1)
    assert abs(float(contrastive_loss(q, p, n, 0.05, "instructor")) -
               float(contrastive_loss(q, p, n, 0.05, "in_batch"))) > 1e-3
    # A single example with no negatives has nothing to contrast against: both losses are 0.
    q, p, n = _inputs(1, 0)
    for mode in ("instructor", "in_batch"):
        assert float(contrastive_loss(q, p, n, 0.05, mode)) == pytest.approx(0.0, abs=1e-6)


def test_bad_arguments_raise():
    q, p, n = _inputs(3, 2)
    with pytest.raises(ValueError, match=r"unknown loss mode 'mnrl'.*'instructor', 'in_batch'"):
        contrastive_loss(q, p, n, 0.05, mode="mnrl")
    for temperature in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            contrastive_loss(q, p, n, temperature)
    with pytest.raises(ValueError, match=r"got q \(3, 16\) and p \(2, 16\)"):
        contrastive_loss(q, p[:2], n, 0.05)
    with pytest.raises(ValueError, match=r"got n \(3, 16\)"):
        contrastive_loss(q, p, n[:, 0], 0.05)
    with pytest.raises(ValueError, match=r"\[3, K, 16\].*got n \(2, 2, 16\)"):
        contrastive_loss(q, p, n[:2], 0.05)
    with pytest.raises(ValueError, match=r"got n \(3, 2, 8\)"):
        contrastive_loss(q, p, n[..., :8], 0.05)
    with pytest.raises(ValueError, match=r"got q \(3, 16\) and p \(3, 8\)"):
        in_batch_retrieval_accuracy(q, p[:, :8])


def test_in_batch_retrieval_accuracy():
    eye = np.eye(4, dtype=np.float32)  # [4, 4]: query i matches only positive i
    assert float(in_batch_retrieval_accuracy(eye, eye)) == 1.0
    swapped = eye[[1, 0, 2, 3]]  # queries 0 and 1 now retrieve each other's positive
    assert float(in_batch_retrieval_accuracy(eye, swapped)) == 0.5
    assert float(in_batch_retrieval_accuracy(eye, eye[::-1])) == 0.0
    assert float(jax.jit(in_batch_retrieval_accuracy)(eye, swapped)) == 0.5
