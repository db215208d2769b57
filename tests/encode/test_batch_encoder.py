"""Bucketed, sharded encoding: bounded compiles, device-count independence, precision options."""

import jax
import numpy as np
import pytest

from instructor_jax.encode import batch_encoder as encoding
from instructor_jax.encode.batch_encoder import REPLICA_MEMORY_SHARE, BatchEncoder, devices_that_fit, plan_batches, prefetch
from instructor_jax.model.tokenization import assign_buckets, default_buckets
from instructor_jax.model.tokenization import TokenizedPairs

INSTRUCTION = "Represent the sentence: "


def _texts(rng, n, max_words=80):
    return ["the old bridge measures heavy rain " * int(k) for k in rng.integers(0, max_words // 6 + 1, size=n)]


def test_default_buckets():
    assert default_buckets(512) == (16, 32, 64, 128, 192, 256, 320, 384, 448, 512)
    assert default_buckets(64) == (16, 32, 64)
    assert default_buckets(100) == (16, 32, 64, 100)
    np.testing.assert_array_equal(assign_buckets(np.array([1, 16, 17, 64]), (16, 32, 64)), [0, 0, 1, 2])
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        assign_buckets(np.array([65]), (16, 32, 64))


def test_plan_covers_every_row_once_sorted_within_buckets():
    lengths = [3, 40, 17, 5, 64, 33, 16, 2]
    tokenized = TokenizedPairs([np.ones(n, np.int32) for n in lengths], np.zeros(len(lengths), np.int32), 0)
    plan = plan_batches(tokenized, 2, (16, 32, 64))
    assert sorted(np.concatenate(plan).tolist()) == list(range(len(lengths)))
    for rows in plan:
        assert len(set(assign_buckets(np.array([lengths[r] for r in rows]), (16, 32, 64)))) == 1
        assert [lengths[r] for r in rows] == sorted((lengths[r] for r in rows), reverse=True)


def test_compile_count_is_bounded_by_the_buckets(relu_instructor):
    # Unpacked (packing=False), over 8 devices at batch 8: one row count, so one program per bucket. A fresh
    # encoder, so that what other tests compiled on the shared model does not count, nor hide a compile.
    model = relu_instructor
    encoder = BatchEncoder(model.config, model.params)
    rng = np.random.default_rng(0)
    seen = set()
    for n in (1, 5, 37, 120, 3):
        tokenized = model.tokenizer.tokenize([[INSTRUCTION, t] for t in _texts(rng, n)])
        encoder.encode(tokenized, 8, model.buckets, packing_mode=False)
        seen |= set(assign_buckets(tokenized.lengths, model.buckets).tolist())
    assert encoder.compile_count == len(seen) <= len(model.buckets)
    again = encoder.compile_count
    tokenized = model.tokenizer.tokenize([[INSTRUCTION, t] for t in _texts(rng, 64)])
    assert set(assign_buckets(tokenized.lengths, model.buckets).tolist()) <= seen
    encoder.encode(tokenized, 8, model.buckets, packing_mode=False)
    assert encoder.compile_count == again  # every shape has been seen: nothing new compiles


def test_sharded_over_eight_devices_equals_one_device(relu_instructor):
    assert len(jax.local_devices()) == 8, "conftest asks for 8 fake CPU devices"
    texts = _texts(np.random.default_rng(1), 30)
    tokenized = relu_instructor.tokenizer.tokenize([[INSTRUCTION, t] for t in texts])
    one = BatchEncoder(relu_instructor.config, relu_instructor.params, devices=jax.local_devices()[:1])
    eight = BatchEncoder(relu_instructor.config, relu_instructor.params)
    assert eight.num_devices == 8 and eight.round_batch_size(5) == 8
    a = one.encode(tokenized, 8, relu_instructor.buckets)
    b = eight.encode(tokenized, 8, relu_instructor.buckets)
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_normalize_false_and_bfloat16(relu_instructor):
    pairs = [[INSTRUCTION, t] for t in _texts(np.random.default_rng(2), 12)]
    unit = relu_instructor.encode(pairs)
    raw = relu_instructor.encode(pairs, normalize=False)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)
    np.testing.assert_allclose(raw / np.linalg.norm(raw, axis=1, keepdims=True), unit, atol=1e-6)
    low = relu_instructor.encode(pairs, dtype="bfloat16")
    assert low.dtype == np.float32 and np.all(np.sum(low * unit, axis=1) > 0.99)


def test_bad_arguments(relu_instructor):
    with pytest.raises(ValueError, match="largest bucket \\(32\\) must be at least max_seq_length \\(64\\)"):
        relu_instructor.encode([["", "a"]], buckets=(16, 32))
    with pytest.raises(ValueError, match="batch_size must be positive"):
        relu_instructor.encode([["", "a"]], batch_size=0)
    with pytest.raises(TypeError, match="input 0 is a str"):
        relu_instructor.encode(["a text and no instruction"])


def test_prefetch_keeps_order_and_raises():
    assert list(prefetch(iter(range(10)), size=3)) == list(range(10))

    def broken():
        yield 1
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        list(prefetch(broken()))


class _Leaf:
    def __init__(self, shape, dtype=np.float32):
        self.shape, self.dtype = shape, np.dtype(dtype)


def test_cpu_encoders_use_as_many_devices_as_parameter_copies_fit():
    devices = jax.local_devices()  # the suite's 8 fake CPU devices
    assert len(devices) == 8
    params = {"a": _Leaf((1000, 250)), "b": _Leaf((250,))}  # 1,001,000 bytes a copy
    copy = 4 * (1000 * 250 + 250)
    assert devices_that_fit(devices, params, available=10 ** 12) == devices
    # Room for exactly 3 more copies: 4 devices (a power of two), then 2, then 1 where not even one fits.
    assert devices_that_fit(devices, params, available=int(3 * copy / REPLICA_MEMORY_SHARE)) == devices[:4]
    assert devices_that_fit(devices, params, available=int(2 * copy / REPLICA_MEMORY_SHARE)) == devices[:2]
    assert devices_that_fit(devices, params, available=copy) == devices[:1]


def test_the_default_encoder_mesh_takes_the_devices_that_fit(relu_instructor, monkeypatch):
    assert BatchEncoder(relu_instructor.config, relu_instructor.params).num_devices == 8
    monkeypatch.setattr(encoding, "available_memory", lambda: 1)  # not even one more copy fits
    assert BatchEncoder(relu_instructor.config, relu_instructor.params).num_devices == 1


def test_attention_is_chosen_per_call_like_dtype(relu_instructor):
    """encode(attention=...) compiles one program per setting; auto is xla on a CPU (the same numbers), a
    fused kernel equals xla (Pallas' TPU interpreter here), and one that cannot run here says why."""
    from instructor_jax.model import attention

    pairs = [[INSTRUCTION, t] for t in _texts(np.random.default_rng(3), 6)]
    tokenized = relu_instructor.tokenizer.tokenize(pairs)
    encoder = BatchEncoder(relu_instructor.config, relu_instructor.params, devices=jax.local_devices()[:1])
    xla = encoder.encode(tokenized, 4, relu_instructor.buckets, packing_mode=True)
    compiled = encoder.compile_count
    np.testing.assert_array_equal(encoder.encode(tokenized, 4, relu_instructor.buckets, packing_mode=True,
                                                 attention="auto"), xla)
    assert encoder.compile_count == 2 * compiled  # its own program
    with attention.emulate_kernels_on_cpu():
        pallas = encoder.encode(tokenized, 4, relu_instructor.buckets, packing_mode=True, attention="pallas_tpu")
    np.testing.assert_allclose(pallas, xla, atol=1e-5, rtol=0)
    with pytest.raises(attention.AttentionNotSupported, match="runs on NVIDIA GPUs, not on cpu; use attention='xla'"):
        encoder.encode(tokenized, 4, relu_instructor.buckets, attention="cudnn")
    with pytest.raises(ValueError, match="attention must be one of"):
        relu_instructor.encode(pairs, attention="flash")
