"""GradCache: the same gradients as the direct step, bounded memory, also under sharding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructor_jax.checkpoints import tensor_table
from instructor_jax.train import data, medi
from instructor_jax.runtime import sharding
from instructor_jax.model.config import HeadConfig
from instructor_jax.train.grad_cache import from_chunks, grad_cache_value_and_grad, to_chunks
from instructor_jax.train.losses import contrastive_loss
from instructor_jax.model.encoder import InstructorModel, init_params, stack_layers, unstack_layers
from instructor_jax.reference import TINY_TOKENIZER
from instructor_jax.model.tokenization import InstructionTokenizer
from instructor_jax.train.config import TrainConfig, tiny_encoder
from instructor_jax.train.step import flat_sequences, make_optimizer, make_train_step


@pytest.fixture(scope="module")
def batches():
    tokenizer = InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=32)
    examples = medi.read_medi(TrainConfig().train_file)
    out = {}
    for k in (0, 1):
        iterator = data.make_train_iterator(examples, 16, tokenizer, num_negatives=k)
        out[k] = [next(iterator) for _ in range(3)]
    return out


def _run(batches, chunk_size, mesh=None, steps=3, loss_mode="instructor", scan_layers=False):
    """(losses, grad norms, final parameters with one entry per layer) of a few steps from the same init."""
    encoder, head = tiny_encoder(), HeadConfig(dense_features=64)
    params = init_params(encoder, head)
    if scan_layers:  # the same initial values, stacked
        encoder = dataclasses.replace(encoder, scan_layers=True, remat=True)
        params = tensor_table.unflatten_params(stack_layers(tensor_table.flatten_params(params), encoder.num_layers))
    model = InstructorModel(encoder, head)
    # adam_eps 1e-3: with the default 1e-8, AdamW turns a rounding-level difference in a near-zero gradient
    # into a full +-lr step, so parameters after a few steps would compare Adam's conditioning, not ours.
    cfg = TrainConfig(batch_size=16, grad_cache_chunk_size=chunk_size, warmup_steps=0, loss_mode=loss_mode,
                      adam_eps=1e-3)
    tx, schedule = make_optimizer(cfg)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    step = jax.jit(make_train_step(model, tx, schedule, cfg))
    losses, grad_norms = [], []
    with sharding.activate(mesh or sharding.make_mesh((1, 1, 1), jax.devices()[:1])):
        for batch in batches[:steps]:
            if mesh is not None:
                batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
            state, metrics = step(state, batch)
            losses.append(float(metrics["loss"]))
            grad_norms.append(float(metrics["grad_norm"]))
    return np.array(losses), np.array(grad_norms), tensor_table.unflatten_params(
        unstack_layers(tensor_table.flatten_params(jax.device_get(state["params"]))))


def _max_diff(a, b):
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()), a, b)))


def test_chunks_are_strided_and_invertible():
    x = jnp.arange(12).reshape(6, 2)
    chunks = to_chunks(x, 2)
    assert chunks.shape == (3, 2, 2) and chunks[0, :, 0].tolist() == [0, 6]  # rows 0 and 3
    np.testing.assert_array_equal(from_chunks(chunks), x)
    with pytest.raises(ValueError, match="do not split into chunks of 5"):
        to_chunks(x, 5)


@pytest.mark.parametrize("negatives", [0, 1])
def test_gradients_equal_the_direct_gradients(batches, negatives):
    encoder, head = tiny_encoder(), HeadConfig(dense_features=64)
    model = InstructorModel(encoder, head)
    params = init_params(encoder, head, seed=3)
    batch = batches[negatives][0]
    groups = {p: flat_sequences(batch, p) for p in ("query", "pos", "neg") if batch[f"{p}_ids"].size}

    def embed_chunk(p, ids, mask, lengths, key):
        return model.apply({"params": p}, ids, mask, lengths)

    def loss(embeddings):
        n = embeddings.get("neg", jnp.zeros((16, 0, 64))).reshape(16, negatives, 64)
        return contrastive_loss(embeddings["query"], embeddings["pos"], n, 0.05), 0.0

    direct_loss, direct = jax.value_and_grad(
        lambda p: loss({g: embed_chunk(p, *groups[g], None) for g in groups})[0])(params)
    (cached_loss, _), cached = jax.jit(lambda p: grad_cache_value_and_grad(
        embed_chunk, loss, p, groups, 4, jax.random.PRNGKey(0)))(params)
    assert abs(float(cached_loss) - float(direct_loss)) < 1e-5
    assert _max_diff(cached, direct) < 1e-5


@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("loss_mode", ["instructor", "in_batch"])
def test_gradcache_matches_the_direct_step(batches, negatives, loss_mode):
    direct = _run(batches[negatives], None, loss_mode=loss_mode)
    cached = _run(batches[negatives], 4, loss_mode=loss_mode)
    np.testing.assert_allclose(cached[0], direct[0], atol=1e-5, rtol=0)  # losses, step by step
    np.testing.assert_allclose(cached[1], direct[1], rtol=1e-5)  # gradient norms
    assert _max_diff(cached[2], direct[2]) < 1e-5  # parameters after three AdamW steps


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned+remat"])
def test_gradcache_under_sharding(batches, scan_layers):
    direct = _run(batches[1], None)
    mesh = sharding.make_mesh((2, 2, 2))
    cached = _run(batches[1], 8, mesh=mesh, scan_layers=scan_layers)
    np.testing.assert_allclose(cached[0], direct[0], atol=1e-5, rtol=0)
    assert _max_diff(cached[2], direct[2]) < 1e-5


def _temp_bytes(batch_size, chunk_size):
    """XLA's temporary-buffer size for one train step on a synthetic batch (compile only, no run)."""
    encoder, head = tiny_encoder(), HeadConfig(dense_features=64)
    model = InstructorModel(encoder, head)
    cfg = TrainConfig(batch_size=batch_size, grad_cache_chunk_size=chunk_size, warmup_steps=0)
    tx, schedule = make_optimizer(cfg)
    params = jax.eval_shape(lambda: init_params(encoder, head))
    state = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params,
             "opt_state": jax.eval_shape(tx.init, params)}
    length = 64
    batch = {f"{p}_{k}": jax.ShapeDtypeStruct(shape, jnp.int32)
             for p, shape in (("query", (batch_size,)), ("pos", (batch_size,)), ("neg", (batch_size, 1)))
             for k, shape in (("ids", shape + (length,)), ("mask", shape + (length,)), ("instruction_lengths", shape))}
    compiled = jax.jit(make_train_step(model, tx, schedule, cfg)).lower(state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_gradcache_memory_stays_flat_as_the_batch_grows():
    cached = {b: _temp_bytes(b, 32) for b in (64, 512)}
    direct = {b: _temp_bytes(b, None) for b in (64, 512)}
    assert direct[512] > 4 * direct[64]  # without GradCache activations grow with the batch
    assert cached[512] < 1.2 * cached[64], cached  # with it they are those of one chunk
