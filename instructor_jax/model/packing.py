"""Packing several inputs into one row, so padding stops costing compute (host side, numpy only).

A packed row holds inputs one after another, each a contiguous segment numbered 1, 2, ... (0 is padding).
For T5 this is exact: attention is limited to the own segment (a block-diagonal mask from the segment ids),
and inside a contiguous segment relative distances are index distances, so the shared relative-position
bias is the same as for the input alone. Pooling is a mean per segment over its text tokens.

Plan: first-fit decreasing by length into rows of a few row lengths (`pack_tiered`: each input in as short
a row as fills well), each row holding at most `max_segments` inputs; every row is then padded to the
smallest row length that holds it, and rows are grouped by row length into batches whose row count is one
of a few sizes. So the programs to compile are bounded by (row lengths) x (row counts), whatever the input.

Training packs differently (`pack_training_batch`): a contrastive step needs the whole batch in one program,
so all of one batch's sequences go into one set of rows of a single row length, with the same first-fit
decreasing packer.
"""

from __future__ import annotations

import dataclasses
import math
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


def row_counts(rows_per_batch: int, num_devices: int, steps_per_octave: int = 1) -> tuple[int, ...]:
    """Row counts a batch may have: num_devices x ceil(2^(k / steps_per_octave)), up to rows_per_batch (a
    multiple of num_devices). One step per octave (encoding) gives powers of two."""
    counts, k = [], 0
    while (count := num_devices * math.ceil(2 ** (k / steps_per_octave) - 1e-9)) < rows_per_batch:
        if not counts or count > counts[-1]:
            counts.append(count)
        k += 1
    return tuple(counts) + (rows_per_batch,)


def pack_rows(lengths: np.ndarray, capacity: int, max_segments: int = MAX_SEGMENTS) -> list[np.ndarray]:
    """First-fit decreasing: input indices per row, longest first within a row, rows in creation order."""
    rows = _Rows(capacity, max_segments)
    rows.place(lengths, np.argsort(-lengths, kind="stable"), new_rows=True)
    return rows.members()


class _Rows:
    """Rows of one capacity being filled first-fit: room left and input count per row."""

    def __init__(self, capacity: int, max_segments: int):
        self.capacity, self.max_segments = capacity, max_segments
        self.remaining = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self._members: list[list[int]] = []

    def place(self, lengths: np.ndarray, order: np.ndarray, new_rows: bool) -> np.ndarray:
        """Puts each input of `order` (longest first) in the first row with room, opening a row when none
        has room and `new_rows`; returns the inputs left unplaced (in order)."""
        left = []
        for index in order:
            length = int(lengths[index])
            if length > self.capacity:
                raise ValueError(f"an input of {length} tokens does not fit a packed row of {self.capacity}")
            fits = np.flatnonzero((self.remaining >= length) & (self.counts < self.max_segments))
            if len(fits):
                row = int(fits[0])
            elif new_rows:
                row = len(self._members)
                self.remaining, self.counts = np.append(self.remaining, self.capacity), np.append(self.counts, 0)
                self._members.append([])
            else:
                left.append(index)
                continue
            self._members[row].append(int(index))
            self.remaining[row] -= length
            self.counts[row] += 1
        return np.asarray(left, np.int64)

    def members(self) -> list[np.ndarray]:
        return [np.asarray(m, np.int64) for m in self._members]


def pack_tiered(lengths: np.ndarray, capacities: Sequence[int], max_segments: int = MAX_SEGMENTS) -> list[np.ndarray]:
    """Rows of several capacities, each input in as short a row as fills well.

    Why: a packed row's attention covers the whole row, so short inputs packed many to a long row pay for
    scores against positions they may not see (on CPU the elementwise work on those [heads, L, L] scores
    costs about as much as the matmuls at L = 512). From the longest capacity down: the inputs too long for
    the next shorter one get rows of this one (first-fit decreasing), then shorter inputs fill what room
    those rows have left (free: the row is computed whole anyway), and the rest go on to shorter rows.
    The shortest capacity takes everything left; inputs near half its length fill it badly, which is why
    `plan_packed_batches` weighs the tierings against each other."""
    capacities = sorted(capacities, reverse=True)
    order = np.argsort(-lengths, kind="stable")
    rows = []
    for k, capacity in enumerate(capacities):
        rows_here = _Rows(capacity, max_segments)
        if k == len(capacities) - 1:
            rows_here.place(lengths, order, new_rows=True)
        else:
            longer = lengths[order] > capacities[k + 1]
            rows_here.place(lengths, order[longer], new_rows=True)
            order = rows_here.place(lengths, order[~longer], new_rows=False)
        rows += rows_here.members()
    return rows


def plan_packed_batches(lengths: np.ndarray, max_seq_length: int, rows_per_batch: int, num_devices: int,
                        max_segments: int = MAX_SEGMENTS, cost=None) -> list[tuple[int, list[np.ndarray]]]:
    """[(row_length, rows: each row's input indices)] per batch: the longest rows first.

    Of the tierings `pack_tiered` can use (the longest row length alone, then down to the half, then to the
    quarter) the one whose padded rows cost least: `cost(row lengths of every row computed)`, by default
    the token slots (so one tier, unless shorter rows also save slots). Shorter rows cut attention;
    their last batch pads more rows, and inputs near half a short row fill it badly: it is a trade."""
    choices = row_lengths(max_seq_length)
    cost = cost or (lambda rows: float(np.sum(rows)))
    best = None
    for shortest in range(len(choices) - 1, -1, -1):  # the longest row length alone first: it wins ties
        plan = _plan_tiers(lengths, choices, choices[shortest:], rows_per_batch, max_seq_length, num_devices,
                           max_segments)
        rows = np.concatenate([np.full(padded_row_count(len(r), length, rows_per_batch, max_seq_length,
                                                        num_devices), length) for length, r in plan] or [[]])
        rows_cost = cost(rows)
        if best is None or rows_cost < best[0]:
            best = (rows_cost, plan)
    return best[1]


def _plan_tiers(lengths, choices, capacities, rows_per_batch, max_seq_length, num_devices, max_segments):
    rows = pack_tiered(lengths, capacities, max_segments)
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
        yield fill_rows(input_ids, instruction_lengths, rows, row_length, num_rows, max_segments)


def fill_rows(input_ids: Sequence[np.ndarray], instruction_lengths: np.ndarray, rows: list[np.ndarray],
              row_length: int, num_rows: int, max_segments: int) -> PackedBatch:
    """The arrays of one batch of `num_rows` rows (those past len(rows) all padding)."""
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
    return PackedBatch(np.asarray(inputs, np.int64), np.asarray(slots, np.int64).reshape(-1, 2), ids, segments,
                       pool, max_segments)


def padded_row_count(rows: int, row_length: int, rows_per_batch: int, max_seq_length: int, num_devices: int) -> int:
    per_batch = rows_in_batch(row_length, rows_per_batch, max_seq_length, num_devices)
    return next(c for c in row_counts(per_batch, num_devices) if c >= rows)


def padded_slots(plan: list[tuple[int, list[np.ndarray]]], rows_per_batch: int, max_seq_length: int,
                 num_devices: int) -> int:
    """Token slots the plan computes (rows x row length, with the padded row counts)."""
    return sum(padded_row_count(len(rows), row_length, rows_per_batch, max_seq_length, num_devices) * row_length
               for row_length, rows in plan)


# ---------------------------------------------------------------------------------------------------------
# Training: one batch, one set of rows

# Row counts a quarter octave apart (~19%): a batch computes at most ~16% padding rows (~8% on average),
# for 4 programs per doubling of the row count rather than 1. Each program is a whole train step, so finer
# steps would buy little padding for many more compiles.
TRAIN_STEPS_PER_OCTAVE = 4


def segments_per_row(row_length: int) -> int:
    """Inputs a training row may hold: every input has at least one token (</s>), so a row of L tokens
    never holds more than L; fewer one-hot columns than MAX_SEGMENTS keep the pooling cheap for short rows."""
    return min(MAX_SEGMENTS, row_length)


def training_row_counts(num_inputs: int, row_unit: int) -> tuple[int, ...]:
    """Row counts a packed training batch of `num_inputs` sequences may have: multiples of `row_unit` a
    quarter octave apart, up to one row per sequence (the most first-fit decreasing can need)."""
    most = -(-num_inputs // row_unit) * row_unit
    return row_counts(most, row_unit, TRAIN_STEPS_PER_OCTAVE)


def training_program_bound(max_seq_length: int, num_inputs: int, row_unit: int) -> int:
    """The most distinct packed shapes (so compiled train steps) batches of `num_inputs` sequences can take:
    len(row_lengths(max_seq_length)) x len(training_row_counts(num_inputs, row_unit)). For example 3 x 3 = 9
    for max_seq_length 512 and 24 sequences (8 triples with one negative) over 8 devices; 3 x 36 = 108 for
    1024 sequences on one device, of which a run meets only the few around its usual tokens per batch."""
    return len(row_lengths(max_seq_length)) * len(training_row_counts(num_inputs, row_unit))


def pack_training_batch(input_ids: Sequence[np.ndarray], instruction_lengths: np.ndarray, max_seq_length: int,
                        row_unit: int) -> PackedBatch:
    """Every input of one training batch in one set of rows, first-fit decreasing: the row length is the
    smallest of `row_lengths(max_seq_length)` that holds the longest input (shorter rows cost less
    attention), the row count the smallest of `training_row_counts` that holds the rows."""
    lengths = np.array([len(ids) for ids in input_ids], np.int64)
    row_length = next(c for c in row_lengths(max_seq_length) if c >= lengths.max())
    segments = segments_per_row(row_length)
    rows = pack_rows(lengths, row_length, segments)
    num_rows = next(c for c in training_row_counts(len(lengths), row_unit) if c >= len(rows))
    return fill_rows(input_ids, instruction_lengths, rows, row_length, num_rows, segments)
