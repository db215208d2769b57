"""Packed rows: every input's embedding equals its unpacked one, and the PyTorch reference's, whatever its
neighbours; the plan is a real bin packing with a bounded set of shapes."""

import numpy as np
import pytest

from instructor_jax.model import packing
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
    short = [["", "a small dog"]] * 200  # 7 tokens each in 16-token buckets: packing saves many slots
    relu_instructor.encode(short, batch_size=16, packing=False)
    unpacked = relu_instructor.batch_encoder.last_plan
    relu_instructor.encode(short, batch_size=16)
    plan = relu_instructor.batch_encoder.last_plan
    # 2048 slots against 3200: two inputs per 16-token row (the shortest rows, cheapest in attention) rather
    # than 1536 in rows of 48, which the FLOP count, attention included, rates dearer for this tiny model.
    assert plan["packed"] and plan["slots"] < 0.7 * unpacked["slots"]


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


def test_tiered_packing_puts_short_inputs_in_short_rows():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(150, 257, size=20), rng.integers(1, 40, size=400)])
    rows = packing.pack_tiered(lengths, (64, 128, 256))
    assert sorted(np.concatenate(rows)) == list(range(len(lengths)))
    used = [int(lengths[r].sum()) for r in rows]
    assert max(used) <= 256 and all(len(r) <= packing.MAX_SEGMENTS for r in rows)
    # The long inputs' rows are filled up with short ones; the rest of the short ones get 64-token rows.
    long_rows = [r for r in rows if lengths[r].max() >= 150]
    assert len(long_rows) == 20 and all(len(r) > 1 for r in long_rows)
    assert sum(u <= 64 for u in used) == len(rows) - 20
    # As full as one tier: within ~10% of the perfect packing of the short inputs left over.
    left = lengths.sum() - sum(used[i] for i, r in enumerate(rows) if lengths[r].max() >= 150)
    assert len(rows) - 20 <= 1.1 * left / 64 + 1


def test_the_plan_weighs_tierings_by_cost():
    lengths = np.full(64, 30)  # fits 2 a 64-row, 8 a 256-row
    by_slots = packing.plan_packed_batches(lengths, 256, 32, 1)
    by_attention = packing.plan_packed_batches(lengths, 256, 32, 1, cost=lambda rows: float(np.sum(rows ** 2)))
    assert {length for length, _ in by_slots} == {256}  # 8 rows of 256: 2048 slots, against 32 x 64 = 2048
    assert {length for length, _ in by_attention} == {64}  # quadratic cost: the short rows
