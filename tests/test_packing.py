"""Packed rows: every input's embedding equals its unpacked one, and the PyTorch reference's, whatever its
neighbours; the plan is a real bin packing with a bounded set of shapes."""

import numpy as np
import pytest

from instructor_jax import packing
from instructor_jax.reference import reference_embeddings

WORDS = "the old bridge measures heavy rain near a small river while dogs sleep Zürich 東京".split()


def _pairs(rng, n):
    instructions = ["Represent the Wikipedia question for retrieving supporting documents: ", "", "x",
                    "Represent the sentence: "]
    pairs = [[instructions[int(rng.integers(len(instructions)))],
              " ".join(rng.choice(WORDS, size=int(rng.integers(0, 30))))] for _ in range(n)]
    pairs += [["", ""],  # one token: </s> alone
              ["", "the old bridge " * 40]]  # truncated to max_seq_length: fills a whole row
    return pairs


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_packed_equals_unpacked_and_the_reference(relu_instructor, relu_reference, batch_size):
    pairs = _pairs(np.random.default_rng(batch_size), 60)
    unpacked = relu_instructor.encode(pairs, batch_size=batch_size, packing=False)
    packed = relu_instructor.encode(pairs, batch_size=batch_size, packing=True)
    assert relu_instructor.batch_encoder.last_plan["packed"]
    assert np.abs(packed - unpacked).max() < 1e-5
    assert np.abs(packed - reference_embeddings(relu_reference[1], pairs)).max() < 1e-5


def test_neighbours_do_not_matter(relu_instructor):
    rng = np.random.default_rng(7)
    pairs = _pairs(rng, 80)
    packed = relu_instructor.encode(pairs, batch_size=8, packing=True)
    order = rng.permutation(len(pairs))
    shuffled = relu_instructor.encode([pairs[i] for i in order], batch_size=8, packing=True)
    np.testing.assert_allclose(shuffled, packed[order], atol=1e-6, rtol=0)
    alone = relu_instructor.encode(pairs[:5], batch_size=8, packing=True)
    np.testing.assert_allclose(alone, packed[:5], atol=1e-6, rtol=0)


def test_packing_is_chosen_when_it_computes_less(relu_instructor):
    short = [["", "a small dog"]] * 200  # ~6 tokens each in 16-token buckets: packing saves most slots
    relu_instructor.encode(short, batch_size=16)
    plan = relu_instructor.batch_encoder.last_plan
    assert plan["packed"] and plan["slots"] / plan["tokens"] < 1.2


def test_compile_count_stays_within_the_bound(relu_instructor):
    encoder = relu_instructor.batch_encoder
    rng = np.random.default_rng(3)
    for n in (1, 9, 70, 150):
        relu_instructor.encode(_pairs(rng, n), batch_size=16, packing=True)
    row_length_choices = packing.row_lengths(relu_instructor.config.max_seq_length)
    # Per row length, the row counts num_devices x 2^k up to that length's rows per batch.
    bound = sum(len(packing.row_counts(packing.rows_in_batch(length, 16, relu_instructor.config.max_seq_length,
                                                             encoder.num_devices), encoder.num_devices))
                for length in row_length_choices)
    before = encoder.compile_count
    for n in (2, 33, 90):
        relu_instructor.encode(_pairs(rng, n), batch_size=16, packing=True)
    # No new shapes once the set is seen; and the whole set is bounded.
    assert encoder.compile_count - before <= bound


def test_first_fit_decreasing_places_every_input_once_within_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=500)
    rows = packing.pack_rows(lengths, capacity=64, max_segments=5)
    placed = np.concatenate(rows)
    assert sorted(placed) == list(range(500))
    assert all(lengths[r].sum() <= 64 and len(r) <= 5 for r in rows)
    # First fit decreasing wastes little: within ~10% of the perfect packing of these lengths.
    assert len(rows) <= 1.1 * max(lengths.sum() / 64, 500 / 5) + 1
    with pytest.raises(ValueError, match="does not fit"):
        packing.pack_rows(np.array([65]), capacity=64)
