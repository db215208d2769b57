"""The Flax encoder against transformers' PyTorch T5 encoder, layer by layer where it matters."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import T5EncoderModel
from transformers.models.t5.modeling_t5 import T5Attention

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.model.encoder import (InstructorModel, T5Encoder, init_boxed_params, init_params, relative_position_buckets,
                                  stack_layers, unstack_layers)
from tests.conftest import REFERENCE_CONFIGS


def test_relative_position_buckets_match_transformers():
    for buckets, distance in ((32, 128), (16, 32)):
        ours = relative_position_buckets(300, 300, buckets, distance)
        relative = torch.arange(300)[None, :] - torch.arange(300)[:, None]
        theirs = T5Attention._relative_position_bucket(relative, bidirectional=True, num_buckets=buckets,
                                                       max_distance=distance)
        np.testing.assert_array_equal(ours, theirs.numpy())


def _load_encoder(directory):
    """(encoder config, encoder params) as the loader reads them from the files, not from our fixtures."""
    config, flat = convert.read_sentence_transformers(directory)
    return config.encoder, tensor_table.unflatten_params({k: jnp.asarray(v) for k, v in flat.items()})["encoder"]


@pytest.mark.parametrize("name", ["relu-2x4", "gated-gelu-3x2", "nondefault"])
def test_hidden_states_match_transformers(reference_models, name):
    directory, _ = reference_models[name]
    cfg, params = _load_encoder(directory)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, size=(3, 40)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 25:] = 0
    mask[2, 3:] = 0
    torch_model = T5EncoderModel.from_pretrained(str(directory)).eval()
    with torch.no_grad():
        theirs = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                             attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
    ours = T5Encoder(cfg).apply({"params": params}, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], theirs[real], atol=1e-5, rtol=0)


def test_padding_and_batch_do_not_change_embeddings():
    cfg = REFERENCE_CONFIGS["relu-2x4"]
    params = init_params(cfg.encoder, cfg.head, seed=1)
    model = InstructorModel(cfg.encoder, cfg.head)
    apply = jax.jit(lambda ids, mask, n: model.apply({"params": params}, ids, mask, n))
    seq = np.arange(5, 25, dtype=np.int32)
    alone = np.asarray(apply(seq[None], np.ones((1, 20), np.int32), np.array([3], np.int32)))[0]
    for length, batch in ((20, 4), (32, 1), (64, 7)):
        ids = np.random.default_rng(length).integers(3, 300, size=(batch, length)).astype(np.int32)
        mask = np.ones_like(ids)
        ids[batch // 2] = 0
        ids[batch // 2, :20] = seq
        mask[batch // 2, 20:] = 0
        n = np.full((batch,), 2, np.int32)
        n[batch // 2] = 3
        got = np.asarray(apply(ids, mask, n))[batch // 2]
        np.testing.assert_allclose(got, alone, atol=1e-6, rtol=0)


def test_every_parameter_has_logical_axes():
    cfg = REFERENCE_CONFIGS["gated-gelu-3x2"]
    model = InstructorModel(cfg.encoder, cfg.head)
    abstract = jax.eval_shape(lambda key: init_boxed_params(model, key), jax.random.PRNGKey(0))
    specs = tensor_table.flatten_params(nn.get_partition_spec(abstract))
    shapes = tensor_table.flatten_params(nn.unbox(abstract))
    assert set(specs) == set(shapes)
    for name, spec in specs.items():
        assert len(spec) == len(shapes[name].shape) and all(spec), f"{name} lacks logical axes: {spec}"
    assert tuple(specs["encoder/layers_0/attention/query"]) == ("embed", "heads", "kv")
    assert tuple(specs["encoder/token_embedder"]) == ("vocab", "embed")


def test_parameter_tree_matches_the_conversion_table():
    for cfg in REFERENCE_CONFIGS.values():
        shapes = {k: v.shape for k, v in tensor_table.flatten_params(init_params(cfg.encoder, cfg.head)).items()}
        table = {t.jax_name: t.jax_shape for t in tensor_table.encoder_layout(cfg.encoder) + tensor_table.dense_layout(cfg)}
        assert shapes == table


def test_remat_and_dropout():
    cfg = REFERENCE_CONFIGS["relu-2x4"]
    params = init_params(cfg.encoder, cfg.head)
    ids = jnp.arange(3, 19, dtype=jnp.int32).reshape(2, 8)
    mask, n = jnp.ones_like(ids), jnp.array([1, 2], jnp.int32)
    plain = InstructorModel(cfg.encoder, cfg.head)
    remat = InstructorModel(dataclasses.replace(cfg.encoder, remat=True), cfg.head)

    def loss(model, p, rng):
        return model.apply({"params": p}, ids, mask, n, deterministic=False, rngs={"dropout": rng}).sum()

    rng = jax.random.PRNGKey(3)
    g_plain = jax.grad(lambda p: loss(plain, p, rng))(params)
    g_remat = jax.grad(lambda p: loss(remat, p, rng))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g_plain, g_remat)
    # Dropout is active in training and changes with the key.
    assert not np.allclose(loss(plain, params, rng), loss(plain, params, jax.random.PRNGKey(4)))
    # Deterministic calls ignore the dropout key.
    np.testing.assert_array_equal(
        plain.apply({"params": params}, ids, mask, n, deterministic=True, rngs={"dropout": rng}),
        plain.apply({"params": params}, ids, mask, n, deterministic=True, rngs={"dropout": jax.random.PRNGKey(4)}))


def test_bfloat16_compute_stays_close_to_float32(relu_reference):
    from instructor_jax import Instructor

    pairs = [["Represent the sentence: ", "the old bridge measures heavy rain"], ["", "a small dog"]]
    full = Instructor.from_pretrained(relu_reference[0]).encode(pairs)
    half = Instructor.from_pretrained(relu_reference[0], dtype="bfloat16")
    assert jax.tree.leaves(half.params)[0].dtype == jnp.bfloat16
    low = half.encode(pairs)
    assert low.dtype == np.float32
    # Measured 1 - cosine ~3e-5 (bf16 matmuls, float32 norm statistics); float32 statistics matter.
    assert np.all(1 - np.sum(full * low, axis=1) < 1e-3)


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scanned_layers_compute_what_unrolled_layers_compute(remat):
    """scan_layers changes the parameter layout (stacked) and the program, not the values or the gradients."""
    cfg = REFERENCE_CONFIGS["gated-gelu-3x2"]
    params = init_params(cfg.encoder, cfg.head, seed=2)
    flat = tensor_table.flatten_params(jax.device_get(params))
    stacked = tensor_table.unflatten_params(stack_layers(flat, cfg.encoder.num_layers))
    assert stacked["encoder"]["layers"]["mlp"]["wi_0"].shape == (3, *params["encoder"]["layers_0"]["mlp"]["wi_0"].shape)
    unrolled = InstructorModel(dataclasses.replace(cfg.encoder, remat=remat), cfg.head)
    scanned = InstructorModel(dataclasses.replace(cfg.encoder, remat=remat, scan_layers=True), cfg.head)
    ids = np.random.default_rng(0).integers(3, 300, size=(3, 16)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 9:] = 0
    n = np.array([0, 2, 5], np.int32)

    def loss(model, p):
        return (model.apply({"params": p}, ids, mask, n) ** 3).sum()

    np.testing.assert_allclose(scanned.apply({"params": stacked}, ids, mask, n),
                               unrolled.apply({"params": params}, ids, mask, n), atol=1e-6, rtol=0)
    g_unrolled = tensor_table.flatten_params(jax.grad(lambda p: loss(unrolled, p))(params))
    g_scanned = unstack_layers(tensor_table.flatten_params(jax.grad(lambda p: loss(scanned, p))(stacked)))
    assert g_scanned.keys() == g_unrolled.keys()
    for name in g_unrolled:
        np.testing.assert_allclose(g_scanned[name], g_unrolled[name], atol=1e-6, rtol=0, err_msg=name)
    # The stacked axis carries its own logical name, so rules can place it.
    abstract = jax.eval_shape(lambda key: init_boxed_params(scanned, key), jax.random.PRNGKey(0))
    specs = tensor_table.flatten_params(nn.get_partition_spec(abstract))
    assert tuple(specs["encoder/layers/attention/query"]) == ("layers", "embed", "heads", "kv")
    assert set(specs) == set(stack_layers(flat, cfg.encoder.num_layers))


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_scan_layers_draws_the_same_parameters_and_dropout_masks(remat):
    """The same seed is the same model in both layouts, and the same dropout key the same masks."""
    encoder = dataclasses.replace(REFERENCE_CONFIGS["gated-gelu-3x2"].encoder, dropout_rate=0.3, remat=remat)
    head = REFERENCE_CONFIGS["gated-gelu-3x2"].head
    unrolled = InstructorModel(encoder, head)
    scanned = InstructorModel(dataclasses.replace(encoder, scan_layers=True), head)
    key = jax.random.PRNGKey(7)
    p_unrolled = nn.unbox(init_boxed_params(unrolled, key))
    p_scanned = nn.unbox(init_boxed_params(scanned, key))
    flat_unrolled = tensor_table.flatten_params(jax.device_get(p_unrolled))
    flat_scanned = unstack_layers(tensor_table.flatten_params(jax.device_get(p_scanned)))
    assert flat_scanned.keys() == flat_unrolled.keys()
    for name in flat_unrolled:
        np.testing.assert_array_equal(flat_scanned[name], flat_unrolled[name], err_msg=name)
    ids = np.random.default_rng(1).integers(3, 300, size=(4, 12)).astype(np.int32)
    mask, n = np.ones_like(ids), np.array([0, 1, 2, 3], np.int32)
    dropout = {"dropout": jax.random.key(3)}
    a = unrolled.apply({"params": p_unrolled}, ids, mask, n, deterministic=False, rngs=dropout)
    b = scanned.apply({"params": p_scanned}, ids, mask, n, deterministic=False, rngs=dropout)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # ... and dropout is on: another key gives other embeddings.
    c = unrolled.apply({"params": p_unrolled}, ids, mask, n, deterministic=False, rngs={"dropout": jax.random.key(4)})
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 1e-3


def test_stack_and_unstack_layers_are_inverse_and_check_the_count():
    cfg = REFERENCE_CONFIGS["relu-2x4"]
    flat = tensor_table.flatten_params(jax.device_get(init_params(cfg.encoder, cfg.head)))
    back = unstack_layers(stack_layers(flat, 2))
    assert back.keys() == flat.keys()
    assert all(np.array_equal(back[k], flat[k]) for k in flat)
    with pytest.raises(ValueError, match=r"expected layers 0..2, got \[0, 1\]"):
        stack_layers(flat, 3)


def test_rms_norm_statistics_are_float32_under_bfloat16():
    """In bfloat16 the only error RMSNorm may add is the final rounding to bfloat16 (half an ulp, 2^-8
    relative): statistics in bfloat16 round the reciprocal norm and the product too, which exceeds that
    somewhere among 64 rows (the end-to-end cosine cannot tell: ~1e-5 either way on a small model)."""
    from instructor_jax.model.config import EncoderConfig
    from instructor_jax.model.encoder import RMSNorm

    cfg = EncoderConfig(d_model=256, dtype="bfloat16")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.lognormal(size=(64, 256)) * rng.choice([-1, 1], size=(64, 256)), jnp.bfloat16)
    out = RMSNorm(cfg).apply({"params": {"scale": jnp.ones((256,), jnp.float32)}}, x)
    assert out.dtype == jnp.bfloat16
    exact = np.asarray(x, np.float64)
    exact = exact / np.sqrt(np.mean(exact ** 2, axis=-1, keepdims=True) + cfg.layer_norm_epsilon)
    relative = np.abs(np.asarray(out, np.float64) - exact) / np.abs(exact)
    assert relative.max() <= 2 ** -8 * (1 + 1e-5), relative.max()
