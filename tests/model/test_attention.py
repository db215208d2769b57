"""The attention implementations against xla on this CPU: Pallas' TPU flash attention in its interpreter,
the cuDNN adapter's arguments through jax.nn.dot_product_attention's xla backend (the
`attention.emulate_kernels_on_cpu` seam), each limit's refusal, auto, and the encoder's other switches.

Bounds (issue 24): 1e-5 in float32, 1e-2 relative in bfloat16 (see `_error`), on the real positions (padding positions are never pooled, and differ between implementations)."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from instructor_jax.model import attention
from instructor_jax.model.config import ATTENTION_NAMES, EncoderConfig, HeadConfig
from instructor_jax.model.encoder import InstructorModel, init_params, stack_layers
from instructor_jax.runtime import sharding

HEADS, HEAD_DIM = 2, 8
BOUND = {"float32": 1e-5, "bfloat16": 1e-2}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _error(ours, reference, dtype: str) -> float:
    """float32: the largest absolute difference. bfloat16: the relative error ||ours - reference|| /
    ||reference|| (bfloat16 keeps 8 bits: two bf16 computations that round in different places differ
    by a few of its 2^-8 steps in the largest entries)."""
    ours, reference = (np.asarray(x, np.float32) for x in (ours, reference))
    if dtype == "float32":
        return float(np.abs(ours - reference).max())
    return float(np.linalg.norm(ours - reference) / max(float(np.linalg.norm(reference)), 1e-30))


def _masks(rows: int, length: int, packed: bool, padding_rows: bool, seed: int = 0):
    """(attention mask, segment ids or None) [rows, length]: varied real lengths, right padding; packed rows
    hold 1 to 3 segments; with `padding_rows`, the last row is all padding."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((rows, length), np.int32)
    segments = np.zeros((rows, length), np.int32)
    for r in range(rows):
        real = int(rng.integers(max(1, length // 2), length + 1))
        mask[r, :real] = 1
        cuts = np.sort(rng.choice(np.arange(1, real), size=min(2, real - 1), replace=False)) if real > 2 else []
        segments[r, :real] = 1 + np.searchsorted(cuts, np.arange(real), side="right")
    if padding_rows:
        mask[-1] = segments[-1] = 0
    return (segments > 0 if packed else mask).astype(np.int32), (segments if packed else None)


def _qkv_bias(rows, length, dtype, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 5)
    q, k, v = (jax.random.normal(keys[i], (rows, length, HEADS, HEAD_DIM)).astype(DTYPES[dtype]) for i in range(3))
    bias = 2 * jax.random.normal(keys[3], (1, HEADS, length, length))  # T5's: float32, shared by all rows
    cotangent = jax.random.normal(keys[4], (rows, length, HEADS, HEAD_DIM))
    return q, k, v, bias, cotangent


def _out_and_grads(implementation, q, k, v, bias, cotangent, mask, segment_ids, real):
    """Output and gradients w.r.t. q, k, v and the position bias of a loss over the real positions only,
    with every array in xla's layout [B, T, heads, d_kv]."""
    dtype = q.dtype
    to_layout, from_layout = ((lambda x: x), (lambda x: x)) if attention.LAYOUTS[implementation] == "blhk" else (
        (lambda x: x.transpose(0, 2, 1, 3)), (lambda x: x.transpose(0, 2, 1, 3)))

    def forward(q, k, v, bias):
        inputs = attention.prepare(implementation, bias, mask, segment_ids)
        out = attention.attend(implementation, *(to_layout(x) for x in (q, k, v)), inputs, dtype=dtype,
                               precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None)
        return from_layout(out)

    def loss(q, k, v, bias):
        out = forward(q, k, v, bias)
        return jnp.sum(out.astype(jnp.float32) * cotangent * real[:, :, None, None])

    return jax.jit(lambda *a: (forward(*a), jax.grad(loss, argnums=(0, 1, 2, 3))(*a)))(q, k, v, bias)


def _compare(implementation, rows, length, dtype, packed, padding_rows):
    mask, segment_ids = _masks(rows, length, packed, padding_rows)
    real = mask.astype(bool)
    q, k, v, bias, cotangent = _qkv_bias(rows, length, dtype)
    reference = _out_and_grads("xla", q, k, v, bias, cotangent, mask, segment_ids, real)
    with attention.emulate_kernels_on_cpu():
        ours = _out_and_grads(implementation, q, k, v, bias, cotangent, mask, segment_ids, real)
    errors = {"out": _error(np.asarray(ours[0], np.float32)[real], np.asarray(reference[0], np.float32)[real], dtype)}
    for name, a, b in zip(("dq", "dk", "dv", "dbias"), ours[1], reference[1]):
        assert np.all(np.isfinite(np.asarray(a, np.float32))), name
        errors[name] = _error(a, b, dtype)
    assert max(errors.values()) < BOUND[dtype], errors
    return errors


PALLAS_CASES = [  # (rows, length, dtype, packed, padding rows): lengths 8 to 512, one case at 512
    (3, 8, "float32", False, True), (3, 40, "float32", True, True), (2, 512, "float32", True, False),
    (3, 200, "bfloat16", False, True), (2, 130, "bfloat16", True, False),
]


@pytest.mark.parametrize("rows, length, dtype, packed, padding_rows", PALLAS_CASES,
                         ids=[f"{d}-L{n}-{'packed' if p else 'unpacked'}{'-padding_row' if z else ''}"
                              for _, n, d, p, z in PALLAS_CASES])
def test_pallas_tpu_forward_and_gradients_equal_xla(rows, length, dtype, packed, padding_rows):
    _compare("pallas_tpu", rows, length, dtype, packed, padding_rows)


CUDNN_CASES = [(3, 24, "float32", False, True), (3, 48, "float32", True, True), (3, 64, "bfloat16", False, True),
               (3, 96, "bfloat16", True, True)]


@pytest.mark.parametrize("rows, length, dtype, packed, padding_rows", CUDNN_CASES,
                         ids=[f"{d}-L{n}-{'packed' if p else 'unpacked'}" for _, n, d, p, _ in CUDNN_CASES])
def test_cudnn_arguments_through_the_xla_backend_equal_xla(rows, length, dtype, packed, padding_rows):
    """The adapter's lengths, bias and mask, run by jax.nn.dot_product_attention's own xla backend (float32
    too, which cuDNN itself refuses: the arguments' meaning is what is checked here)."""
    _compare("cudnn", rows, length, dtype, packed, padding_rows)


def test_cudnn_arguments_keep_the_shared_bias_and_layout():
    mask, _ = _masks(4, 16, packed=False, padding_rows=True)
    q, k, v, bias, _ = _qkv_bias(4, 16, "bfloat16")
    arguments = attention.cudnn_arguments(q, k, v, attention.cudnn_inputs(bias, mask))
    assert arguments["query"] is q and arguments["key"] is k and arguments["value"] is v  # [B, T, heads, d_kv]
    assert arguments["bias"].shape == (1, HEADS, 16, 16) and arguments["mask"] is None  # no [B, heads, T, T]
    np.testing.assert_array_equal(arguments["query_seq_lengths"], np.maximum(mask.sum(1), 1))
    assert arguments["query_seq_lengths"].dtype == jnp.int32 and int(arguments["query_seq_lengths"][-1]) == 1
    assert arguments["key_value_seq_lengths"] is arguments["query_seq_lengths"] and arguments["scale"] == 1.0
    mask, segments = _masks(4, 16, packed=True, padding_rows=True)
    packed = attention.cudnn_arguments(q, k, v, attention.cudnn_inputs(bias, mask, segments))
    assert packed["bias"].shape == (1, HEADS, 16, 16) and packed["mask"].shape == (4, 1, 16, 16)
    assert packed["mask"].dtype == jnp.bool_ and packed["query_seq_lengths"] is None


def test_pallas_blocks_and_padding():
    assert [attention.padded_length(n) for n in (8, 128, 130, 512, 520)] == [128, 128, 256, 512, 640]
    assert [attention.pallas_block(n) for n in (128, 384, 512, 640, 768, 1024, 1152)] == [128, 384, 512, 128, 384,
                                                                                         512, 384]
    inputs = attention.pallas_inputs(jnp.zeros((1, HEADS, 40, 40)), np.ones((3, 40), np.int32))
    assert inputs["ab"].shape == (3, HEADS, 128, 128) and inputs["segment_ids"].shape == (3, 128)
    assert int(inputs["segment_ids"][:, 40:].max()) == 0


REFUSALS = [  # (implementation, check arguments, what the message must say)
    ("cudnn", dict(on="cpu"), "runs on NVIDIA GPUs, not on cpu; use attention='xla'"),
    ("cudnn", dict(on="tpu"), "use attention='xla' or 'pallas_tpu'"),
    ("cudnn", dict(dtype="float32"), "computes in bfloat16"),
    ("cudnn", dict(head_dim=12), "multiple of 8 and at most 128"),
    ("cudnn", dict(head_dim=192), "at most 128 on this GPU"),
    ("cudnn", dict(gpu_capability=(7, 0)), "needs an sm80+ GPU"),
    ("cudnn", dict(length=33, training=True), "even length, got 33"),
    ("cudnn", dict(training=True, attention_dropout=0.1), "TrainConfig.attention_dropout_rate = 0.0"),
    ("pallas_tpu", dict(on="gpu"), "runs on TPUs, not on gpu; use attention='xla' or 'cudnn'"),
    ("pallas_tpu", dict(head_dim=192), "head dim (d_kv) of at most 128 or a multiple of it, got 192"),
    ("pallas_tpu", dict(on="tpu", training=True, attention_dropout=0.1), "EncoderConfig.attention_dropout_rate"),
]


@pytest.mark.parametrize("implementation, changes, message", REFUSALS, ids=[m for _, _, m in REFUSALS])
def test_each_limit_is_refused_with_its_message(implementation, changes, message):
    allowed = dict(on={"cudnn": "gpu", "pallas_tpu": "tpu"}[implementation], dtype="bfloat16", head_dim=64,
                   length=32, training=False, attention_dropout=0.0, gpu_capability=(8, 0))
    attention.check(implementation, **allowed)  # within every limit
    with pytest.raises(attention.AttentionNotSupported, match=re.escape(message)):
        attention.check(implementation, **{**allowed, **changes})


def test_limits_that_depend_on_the_gpu_or_on_training():
    allowed = dict(on="gpu", dtype="bfloat16", head_dim=64, length=32, training=False, attention_dropout=0.1,
                   gpu_capability=(8, 0))
    attention.check("cudnn", **allowed)  # dropout and odd lengths matter only in training
    attention.check("cudnn", **{**allowed, "length": 33})
    attention.check("cudnn", **{**allowed, "head_dim": 192, "gpu_capability": (9, 0)})  # Hopper: up to 256
    attention.check("xla", **{**allowed, "on": "cpu", "dtype": "float32", "training": True, "head_dim": 7})
    with attention.emulate_kernels_on_cpu():  # the seam lifts the platform, and nothing else
        attention.check("pallas_tpu", **{**allowed, "on": "cpu"})
        with pytest.raises(attention.AttentionNotSupported, match="computes in bfloat16"):
            attention.check("cudnn", **{**allowed, "on": "cpu", "dtype": "float32"})


def test_auto_is_xla_until_a_device_measures_otherwise(monkeypatch):
    assert ATTENTION_NAMES == attention.NAMES
    assert attention.MEASURED_FASTER == {}  # nothing measured on an accelerator yet
    for on in ("cpu", "gpu", "tpu"):
        assert {attention.resolve("auto", on, packed) for packed in (False, True)} == {"xla"}
    monkeypatch.setitem(attention.MEASURED_FASTER, ("gpu", "packed"), "cudnn")
    assert attention.resolve("auto", "gpu", True) == "cudnn" and attention.resolve("auto", "gpu", False) == "xla"
    with pytest.raises(attention.AttentionNotSupported, match="one of"):
        attention.resolve("flash", "gpu", True)


def test_xla_attention_is_the_encoder_computation():
    """xla is today's computation, op for op (the PyTorch parity tests rely on it)."""
    q, k, v, bias, _ = _qkv_bias(2, 16, "float32")
    mask, _ = _masks(2, 16, packed=False, padding_rows=False)
    full_bias = bias + jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) + full_bias
    expected = jnp.einsum("bhqs,bshk->bqhk", jax.nn.softmax(scores, axis=-1), v)
    ours = attention.attend("xla", q, k, v, attention.prepare("xla", bias, mask), dtype=jnp.float32)
    np.testing.assert_array_equal(ours, expected)


# --- the whole model and a whole train step -----------------------------------------------------------

ENCODER = EncoderConfig(vocab_size=64, d_model=16, d_kv=HEAD_DIM, d_ff=32, num_layers=2, num_heads=HEADS,
                        dropout_rate=0.1, attention_dropout_rate=0.0)
HEAD = HeadConfig(dense_features=8)


def _stacked(params):
    """Unrolled parameters in the scan_layers layout."""
    from flax import traverse_util

    flat = stack_layers(traverse_util.flatten_dict(params, sep="/"), ENCODER.num_layers)
    return jax.tree.map(jnp.asarray, traverse_util.unflatten_dict(flat, sep="/"))


def _model_batch(rows=4, length=48, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, ENCODER.vocab_size, (rows, length)).astype(np.int32)
    mask, _ = _masks(rows, length, packed=False, padding_rows=True, seed=seed)
    _, segments = _masks(rows, length, packed=True, padding_rows=True, seed=seed + 1)
    return ids * mask, mask, np.minimum(rng.integers(0, 4, rows), mask.sum(1)).astype(np.int32), ids, segments


def _embeddings(encoder, params, batch):
    ids, mask, instruction, packed_ids, segments = batch
    model = InstructorModel(encoder, HEAD)
    return jax.jit(lambda p: (model.apply({"params": p}, ids, mask, instruction),
                              model.apply({"params": p}, packed_ids * (segments > 0), segments,
                                          (segments > 0).astype(np.int32), 3, method=InstructorModel.packed)))(params)


@pytest.mark.parametrize("implementation, dtype", [("pallas_tpu", "float32"), ("pallas_tpu", "bfloat16"),
                                                   ("cudnn", "bfloat16")])
def test_whole_model_equals_xla(implementation, dtype):
    """Unpacked and packed embeddings (scanned layers: one layer to trace)."""
    encoder = dataclasses.replace(ENCODER, dtype=dtype, scan_layers=True)
    params = _stacked(init_params(dataclasses.replace(encoder, scan_layers=False), HEAD, seed=2))
    batch = _model_batch()
    reference = _embeddings(encoder, params, batch)
    with attention.emulate_kernels_on_cpu():
        ours = _embeddings(dataclasses.replace(encoder, attention=implementation), params, batch)
    real_rows = batch[1].sum(1) > 0  # the all-padding row's embedding is no one's
    packed_slots = np.stack([[(batch[4][r] == s + 1).any() for s in range(3)] for r in range(len(batch[4]))])
    assert _error(ours[0][real_rows], reference[0][real_rows], dtype) < BOUND[dtype]
    assert _error(ours[1][packed_slots], reference[1][packed_slots], dtype) < BOUND[dtype]


def _train_batches(rows=4, length=32, seed=0):
    """A (query, positive, negative) batch, unpacked and packed (train.data's layouts)."""
    from instructor_jax.train import data

    rng = np.random.default_rng(seed)
    batch = {}
    for part, shape in (("query", (rows,)), ("pos", (rows,)), ("neg", (rows, 1))):
        count = int(np.prod(shape))
        lengths = rng.integers(4, length + 1, count)
        mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(3, ENCODER.vocab_size, (count, length)).astype(np.int32) * mask
        batch[f"{part}_ids"], batch[f"{part}_mask"] = ids.reshape(*shape, length), mask.reshape(*shape, length)
        batch[f"{part}_instruction_lengths"] = rng.integers(0, 3, count).astype(np.int32).reshape(shape)
    return batch, data.pack_batch(batch, length, 2)


# Pallas' interpreter takes ~7 s to compile and run the unpacked step's three embedding passes: it trains
# packed here (the layout MEDI's lengths get), its unpacked numerics are the kernel and model tests' above.
TRAIN_CASES = [("pallas_tpu", "float32", ("packed",)), ("cudnn", "bfloat16", ("unpacked", "packed"))]


@pytest.mark.parametrize("implementation, dtype, layouts", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_whole_train_step_equals_xla(implementation, dtype, layouts):
    """The trainer's loss, accuracy and gradients (train.step.make_value_and_grad), with the residual dropout
    on (the same masks: attention-weight dropout is off, as the fused kernels need) and scanned layers (the
    configs' setting; one layer to trace)."""
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.step import make_value_and_grad

    cfg = TrainConfig(batch_size=2, max_seq_length=32, dtype=dtype)
    encoder = dataclasses.replace(ENCODER, dtype=dtype, scan_layers=True)
    params = _stacked(init_params(dataclasses.replace(encoder, scan_layers=False), HEAD, seed=3))
    unpacked, packed = _train_batches(rows=2)
    batches = [{"unpacked": unpacked, "packed": packed}[layout] for layout in layouts]

    def run(encoder):
        value_and_grad = make_value_and_grad(InstructorModel(encoder, HEAD), cfg)
        return jax.jit(lambda p, key, *b: [value_and_grad(p, x, key) for x in b])(params, jax.random.key(5), *batches)

    reference = run(encoder)
    with attention.emulate_kernels_on_cpu():
        ours = run(dataclasses.replace(encoder, attention=implementation))
    for ((loss, accuracy), grads), ((ref_loss, ref_accuracy), ref_grads) in zip(ours, reference):
        assert _error(loss, ref_loss, dtype) < BOUND[dtype] and float(accuracy) == float(ref_accuracy)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert _error(a, b, dtype) < BOUND[dtype]


def test_a_refused_implementation_stops_the_model_with_its_message():
    params = init_params(ENCODER, HEAD)
    ids, mask, instruction, *_ = _model_batch()
    model = InstructorModel(dataclasses.replace(ENCODER, attention="cudnn", dtype="bfloat16"), HEAD)
    with pytest.raises(attention.AttentionNotSupported, match="runs on NVIDIA GPUs, not on cpu"):
        model.apply({"params": params}, ids, mask, instruction)
    dropping = InstructorModel(dataclasses.replace(ENCODER, attention="pallas_tpu", attention_dropout_rate=None), HEAD)
    with attention.emulate_kernels_on_cpu(), pytest.raises(attention.AttentionNotSupported,
                                                           match="attention_dropout_rate = 0.0"):
        dropping.apply({"params": params}, ids, mask, instruction, deterministic=False,
                       rngs={"dropout": jax.random.PRNGKey(0)})
    # auto on this CPU is xla, op for op.
    auto = InstructorModel(dataclasses.replace(ENCODER, attention="auto"), HEAD)
    np.testing.assert_array_equal(auto.apply({"params": params}, ids, mask, instruction),
                                  InstructorModel(ENCODER, HEAD).apply({"params": params}, ids, mask, instruction))


# --- the other switches --------------------------------------------------------------------------------

def test_fused_qkv_and_bfloat16_elementwise_stay_within_bounds():
    """Each switch keeps the checkpoint's parameters and stays within the bounds of the default computation:
    fused projections in float32 (embeddings and gradients), bfloat16 elementwise work in bfloat16."""
    ids, mask, instruction, *_ = batch = _model_batch()

    def embeddings_and_grads(encoder, params):
        model = InstructorModel(encoder, HEAD)
        # Before the L2 norm: the all-padding row's zero vector has a NaN norm gradient.
        loss = lambda p: jnp.sum(model.apply({"params": p}, ids, mask, instruction, normalize=False) ** 3)  # noqa: E731
        return jax.jit(lambda p: (_embeddings(encoder, p, batch), jax.grad(loss)(p)))(params)

    params = init_params(ENCODER, HEAD, seed=4)
    fused = dataclasses.replace(ENCODER, fused_qkv=True)
    assert jax.tree.structure(init_params(fused, HEAD)) == jax.tree.structure(params)  # the same checkpoint
    for a, b in zip(jax.tree.leaves(embeddings_and_grads(fused, params)),
                    jax.tree.leaves(embeddings_and_grads(ENCODER, params))):
        assert _error(a, b, "float32") < BOUND["float32"]
    bf16 = dataclasses.replace(ENCODER, dtype="bfloat16")
    for a, b in zip(_embeddings(dataclasses.replace(bf16, bfloat16_elementwise=True), params, batch),
                    _embeddings(bf16, params, batch)):
        assert _error(a, b, "bfloat16") < BOUND["bfloat16"]


def _primitive_counts(num_layers: int, scan_layers: bool) -> dict:
    """How often each primitive occurs in a training forward pass (random_split by its output shape)."""
    encoder = dataclasses.replace(ENCODER, num_layers=num_layers, scan_layers=scan_layers)
    model = InstructorModel(encoder, HEAD)
    params = init_params(encoder, HEAD)
    ids, mask, instruction, *_ = _model_batch()
    jaxpr = jax.make_jaxpr(lambda p, key: model.apply({"params": p}, ids, mask, instruction, deterministic=False,
                                                      rngs={"dropout": key}))(params, jax.random.PRNGKey(0))
    counts: dict = {}

    def visit(jaxpr):
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            key = (name, eqn.outvars[0].aval.shape) if name == "random_split" else name
            counts[key] = counts.get(key, 0) + 1
            for param in eqn.params.values():
                for item in param if isinstance(param, (tuple, list)) else (param,):
                    inner = getattr(item, "jaxpr", item)
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jaxpr.jaxpr)
    return counts


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_position_bias_and_layer_keys_are_made_once_per_forward(scan_layers):
    """The relative bias's bucket gather and the split of the per-layer dropout keys happen once per forward,
    however many layers; each layer only splits its own key over its 4 dropout sites."""
    one, three = _primitive_counts(1, scan_layers), _primitive_counts(3, scan_layers)
    assert one["gather"] == three["gather"] == 2  # the token embedding's and the relative bias's
    assert one[("random_split", (1,))] == three[("random_split", (3,))] == 1  # the layers' keys: one split
    assert three[("random_split", (4,))] == (1 if scan_layers else 3)  # each layer's own sites


def test_on_each_shard_runs_a_kernel_per_device_and_equals_the_whole():
    """The Pallas call's wrapper, with a stand-in kernel on 4 CPU devices (the TPU interpreter runs one)."""
    mesh = sharding.make_mesh((2, 1, 2), jax.devices()[:4])
    q, k, v, _, _ = _qkv_bias(4, 16, "float32")
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, heads, T, d_kv]
    ab = jax.random.normal(jax.random.PRNGKey(1), (4, HEADS, 16, 16))
    ids = jnp.ones((4, 16), jnp.int32)
    shapes = []

    def kernel(q, k, v, ab, ids):
        shapes.append(q.shape)
        scores = jnp.einsum("bhqd,bhkd->bhqk", q, k) + ab + 0 * ids[:, None, None, :]
        return jnp.einsum("bhqk,bhkd->bhqd", jax.nn.softmax(scores), v)

    with sharding.activate(mesh):
        out = jax.jit(lambda *a: attention.on_each_shard(
            kernel, a, (("batch", "heads", None, None),) * 4 + (("batch", None),), ("batch", "heads", None, None)))(
            q, k, v, ab, ids)
    assert shapes == [(2, 1, 16, HEAD_DIM)]  # each device: its 2 rows and its 1 head
    np.testing.assert_allclose(out, kernel(q, k, v, ab, ids), atol=1e-6)
