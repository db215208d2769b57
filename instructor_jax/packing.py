"""Packing several inputs into one row, so padding stops costing compute (host side, numpy only).

A packed row holds inputs one after another, each a contiguous segment numbered 1, 2, ... (0 is padding).
For T5 this is exact: attention is limited to the own segment (a block-diagonal mask from the segment ids),
and inside a contiguous segment relative distances are index distances, so the shared relative-position
bias is the same as for the input alone. Pooling is a mean per segment over its text tokens.

Plan: first-fit decreasing by length into rows of the largest row length, each row holding at most
`max_segments` inputs; every row is then padded to the smallest of a few row lengths that holds it, and
rows are grouped by row length into batches whose row count is one of a few sizes. So the programs to
compile are bounded by (row lengths) x (row counts), whatever the input.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence

import numpy as np

MAX_SEGMENTS = 64  # inputs per row: the pooling's one-hot is [rows, row_length, MAX_SEGMENTS]


@dataclasses.dataclass
class PackedBatch:
    inputs: np.ndarray  # [n] positions of the packed inputs in the caller's order
    slots: np.ndarray  # [n, 2] (row, segment - 1) of each input: where its embedding comes back
    input_ids: np.ndarray  # [rows, row_length] int32
    segment_ids: np.ndarray  # [rows, row_length] int32: 1.. per input, 0 padding
    pool_mask: np.ndarray  # [rows, row_length] int32: 1 on the text tokens each segment's mean covers
    max_segments: int


def row_lengths(max_seq_length: int) -> tuple[int, ...]:
    """The packed row lengths: the longest input's length (rounded up to a multiple of 16), its half and
    its quarter. A row is padded by at most ~half its length, and only the last rows of a plan are short."""
    longest = -(-max_seq_length // 16) * 16
    return tuple(sorted({max(16, -(-longest // d // 16) * 16) for d in (1, 2, 4)}))


def rows_in_batch(row_length: int, rows_per_batch: int, max_seq_length: int, num_devices: int) -> int:
    """Rows per batch of `row_length`: shorter rows get more, for about the same tokens in every batch."""
    longest = row_lengths(max_seq_length)[-1]
    return max(num_devices, rows_per_batch * longest // row_length // num_devices * num_devices)


def row_counts(rows_per_batch: int, num_devices: int) -> tuple[int, ...]:
    """Row counts a batch may have: num_devices x powers of two, up to rows_per_batch (a multiple of it)."""
    counts, count = [], num_devices
    while count < rows_per_batch:
        counts.append(count)
        count *= 2
    return tuple(counts) + (rows_per_batch,)


def pack_rows(lengths: np.ndarray, capacity: int, max_segments: int = MAX_SEGMENTS) -> list[np.ndarray]:
    """First-fit decreasing: input indices per row, longest first within a row, rows in creation order."""
    order = np.argsort(-lengths, kind="stable")
    remaining = np.zeros(0, np.int64)  # room left in each row
    counts = np.zeros(0, np.int64)
    members: list[list[int]] = []
    for index in order:
        length = int(lengths[index])
        if length > capacity:
            raise ValueError(f"an input of {length} tokens does not fit a packed row of {capacity}")
        fits = np.flatnonzero((remaining >= length) & (counts < max_segments))
        if len(fits):
            row = int(fits[0])
        else:
            row = len(members)
            remaining, counts = np.append(remaining, capacity), np.append(counts, 0)
            members.append([])
        members[row].append(int(index))
        remaining[row] -= length
        counts[row] += 1
    return [np.asarray(m, np.int64) for m in members]


def plan_packed_batches(lengths: np.ndarray, max_seq_length: int, rows_per_batch: int, num_devices: int,
                        max_segments: int = MAX_SEGMENTS) -> list[tuple[int, list[np.ndarray]]]:
    """[(row_length, rows: each row's input indices)] per batch: the longest rows first."""
    choices = row_lengths(max_seq_length)
    rows = pack_rows(lengths, choices[-1], max_segments)
    by_length: dict[int, list[np.ndarray]] = {}
    for members in rows:
        used = int(lengths[members].sum())
        by_length.setdefault(next(c for c in choices if c >= used), []).append(members)
    batches = []
    for row_length in sorted(by_length, reverse=True):
        per_batch = rows_in_batch(row_length, rows_per_batch, max_seq_length, num_devices)
        group = by_length[row_length]
        batches += [(row_length, group[i:i + per_batch]) for i in range(0, len(group), per_batch)]
    return batches


def packed_batches(input_ids: Sequence[np.ndarray], instruction_lengths: np.ndarray,
                   plan: list[tuple[int, list[np.ndarray]]], rows_per_batch: int, max_seq_length: int,
                   num_devices: int, max_segments: int = MAX_SEGMENTS) -> Iterator[PackedBatch]:
    """The arrays of each planned batch; the row count is padded up to one of `row_counts`."""
    for row_length, rows in plan:
        num_rows = padded_row_count(len(rows), row_length, rows_per_batch, max_seq_length, num_devices)
        ids = np.zeros((num_rows, row_length), np.int32)
        segments = np.zeros((num_rows, row_length), np.int32)
        pool = np.zeros((num_rows, row_length), np.int32)
        inputs, slots = [], []
        for r, members in enumerate(rows):
            offset = 0
            for s, index in enumerate(members):
                seq = input_ids[index]
                end = offset + len(seq)
                ids[r, offset:end] = seq
                segments[r, offset:end] = s + 1
                pool[r, offset + int(instruction_lengths[index]):end] = 1
                inputs.append(index)
                slots.append((r, s))
                offset = end
        yield PackedBatch(np.asarray(inputs, np.int64), np.asarray(slots, np.int64).reshape(-1, 2), ids, segments,
                          pool, max_segments)


def padded_row_count(rows: int, row_length: int, rows_per_batch: int, max_seq_length: int, num_devices: int) -> int:
    per_batch = rows_in_batch(row_length, rows_per_batch, max_seq_length, num_devices)
    return next(c for c in row_counts(per_batch, num_devices) if c >= rows)


def padded_slots(plan: list[tuple[int, list[np.ndarray]]], rows_per_batch: int, max_seq_length: int,
                 num_devices: int) -> int:
    """Token slots the plan computes (rows x row length, with the padded row counts)."""
    return sum(padded_row_count(len(rows), row_length, rows_per_batch, max_seq_length, num_devices) * row_length
               for row_length, rows in plan)
