"""Jit-compiled encoding of tokenized inputs in length buckets.

Each input is padded to the smallest bucket that holds it, judged by its own length alone, and batches
have a fixed size: so an input's embedding never depends on what else is in the call, and the number of
compiled programs is bounded by the number of buckets.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from instructor_jax.tokenization import TokenizedPairs, pad_batch


def default_buckets(max_seq_length: int, smallest: int = 16) -> tuple[int, ...]:
    """Powers of two from `smallest`, capped by (and ending at) max_seq_length."""
    buckets, length = [], smallest
    while length < max_seq_length:
        buckets.append(length)
        length *= 2
    return tuple(buckets) + (max_seq_length,)


def assign_buckets(lengths: np.ndarray, buckets: Sequence[int]) -> np.ndarray:
    """Index of the smallest bucket that holds each length."""
    buckets = np.asarray(sorted(buckets))
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(f"a sequence of {lengths.max()} tokens exceeds the largest bucket {buckets[-1]}")
    return np.searchsorted(buckets, lengths, side="left")


def encode_tokenized(apply_fn: Callable, tokenized: TokenizedPairs, output_dim: int, batch_size: int,
                     buckets: Sequence[int], show_progress_bar: bool = False) -> np.ndarray:
    """Runs `apply_fn(ids, mask, instruction_lengths) -> [batch, dim]` over every input; input order kept."""
    n = len(tokenized.input_ids)
    out = np.zeros((n, output_dim), dtype=np.float32)
    if n == 0:
        return out
    buckets = sorted(buckets)
    lengths = tokenized.lengths
    which = assign_buckets(lengths, buckets)
    # Longest first, so the largest compile and any memory error come at once, not at the end.
    order = np.lexsort((-lengths, -which))
    progress = tqdm(total=n, disable=not show_progress_bar, desc="encoding", unit="text")
    start = 0
    while start < n:
        bucket = which[order[start]]
        stop = start
        while stop < n and stop - start < batch_size and which[order[stop]] == bucket:
            stop += 1
        rows = order[start:stop]
        ids, mask = pad_batch([tokenized.input_ids[i] for i in rows], buckets[bucket], batch_size)
        instruction_lengths = np.zeros((batch_size,), np.int32)
        instruction_lengths[:len(rows)] = tokenized.instruction_lengths[rows]
        out[rows] = np.asarray(apply_fn(ids, mask, instruction_lengths))[:len(rows)]
        progress.update(len(rows))
        start = stop
    progress.close()
    return out
