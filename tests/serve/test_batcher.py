"""The batcher's programs: every packed plan a batch can have runs a shape compiled at warm-up (checked on
plans alone: nothing compiles here)."""

import queue

import jax
import numpy as np
import pytest

from instructor_jax.encode.batch_encoder import BatchEncoder
from instructor_jax.model.tokenization import TokenizedPairs, default_buckets
from instructor_jax.serve import batcher as batching


def _tokenized(lengths):
    return TokenizedPairs([np.ones(int(n), np.int32) for n in lengths], np.zeros(len(lengths), np.int32), 0)


@pytest.mark.parametrize("max_seq_length,devices,max_batch_tokens", [(64, 8, 256), (48, 2, 200), (512, 4, 16384),
                                                                      (512, 1, 4096), (100, 4, 1000)])
def test_every_batch_runs_a_warmed_shape(relu_instructor, max_seq_length, devices, max_batch_tokens):
    config = relu_instructor.config.replace(max_seq_length=max_seq_length)
    encoder = BatchEncoder(config, relu_instructor.params, devices=jax.local_devices()[:devices])
    rows = batching.default_rows_per_batch(max_batch_tokens, max_seq_length, devices)
    programs = batching.Programs(encoder, default_buckets(max_seq_length), rows, max_seq_length)
    warmed = set(programs.shapes())
    reached = set()
    for tokenized, packed in programs.warm_up_inputs(token_id=1):
        reached |= programs.planned(tokenized, packed)
    assert reached == warmed
    rng = np.random.default_rng(0)
    for trial in range(40):
        # what the batcher can take: any lengths 1..max_seq_length, at most max_batch_tokens in all
        lengths = rng.integers(1, max_seq_length + 1, size=int(rng.integers(1, 80)))
        lengths = lengths[np.cumsum(lengths) <= max_batch_tokens] if lengths[0] < max_batch_tokens else lengths[:1]
        packed = programs.packs(_tokenized(lengths))
        assert programs.planned(_tokenized(lengths), packed) <= warmed, (trial, lengths)
    assert not programs.packs(_tokenized([max_seq_length // 2]))  # one input: its bucket, not a packed row
    assert encoder.compile_count == 0


def test_large_jobs_are_split_in_order_and_cancelled_jobs_leave_the_queue():
    calls = []

    class Programs:  # what the batcher needs of its programs, without a model
        compile_count = 0

        def encode(self, tokenized):
            calls.append(tokenized.lengths.tolist())
            return np.stack([np.full(3, len(ids), np.float32) for ids in tokenized.input_ids]), 0

    done = queue.Queue()
    batcher = batching.Batcher(Programs(), max_batch_tokens=10, max_wait_s=0, normalizes=False)
    with batcher.hold():
        batcher.start()
        big = batching.Job(_tokenized([4, 4, 4, 4, 1]), False, done.put, 3)
        gone = batching.Job(_tokenized([2, 2]), False, done.put, 3)
        small = batching.Job(_tokenized([5]), False, done.put, 3)
        for job in (big, gone, small):
            batcher.submit(job)
        batcher.cancel(gone)
        assert batcher.queued_inputs == 6 and batcher.queued_tokens == 22
    finished = [done.get(timeout=30), done.get(timeout=30)]
    batcher.stop(timeout=30)
    assert finished == [big, small] and done.empty() and batcher.idle()
    assert calls == [[4, 4], [4, 4, 1], [5]]  # FIFO, at most 10 tokens a batch
    for job in finished:
        assert job.error is None
        np.testing.assert_array_equal(job.out[:, 0], job.lengths)


def test_a_batch_takes_the_queue_head_up_to_the_token_budget():
    batcher = batching.Batcher(None, max_batch_tokens=10, max_wait_s=0, normalizes=False)
    big = batching.Job(_tokenized([4, 4, 4, 4, 1]), False, lambda job: None, 3)
    small = batching.Job(_tokenized([5]), False, lambda job: None, 3)
    for job in (big, small):
        batcher.submit(job)
    assert [(a, b) for _, a, b in batcher.slice_queue()] == [(0, 2)]
    assert [(a, b) for _, a, b in batcher.slice_queue()] == [(2, 5)]
    assert [(j is small, a, b) for j, a, b in batcher.slice_queue()] == [(True, 0, 1)]
    assert not batcher.queue and batcher.queued_tokens == 0
    huge = batching.Job(_tokenized([30]), False, lambda job: None, 3)  # over the budget alone: still taken
    batcher.submit(huge)
    assert [(a, b) for _, a, b in batcher.slice_queue()] == [(0, 1)]
