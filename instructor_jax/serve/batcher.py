"""The dynamic batcher: one queue of tokenized inputs, one worker thread that encodes them in batches, and
the fixed set of programs those batches can run (all compiled at start-up).

A batch is the inputs at the head of the queue, first come first served, up to `max_batch_tokens` real
tokens (a request larger than that is split over batches and put back together in order). When the worker
is free and the queue holds less than a full batch, it waits at most `max_wait_s` for more.

Every batch goes through `BatchEncoder.encode` in one of two layouts with fixed row counts: packed
(`packing_mode=True`, `rows_per_batch` rows) or, where that costs less (a few inputs), padded to its
buckets with one row per device; always with `normalize=False` (the L2 norm, where the request and the
model ask for it, is taken here in float32, as the model's own head does). So the programs a batch can run
are a short list known in advance (`Programs.shapes`: the packed (row length, row count) pairs and one
padded program per bucket), whatever the inputs, and `Programs.warm_up` compiles every one of them before
the server says it is ready. No request ever waits for a compile. An input's embedding depends on its
neighbours only through float rounding (~1e-7 packed, not at all padded; see instructor_jax.model.packing),
so it does not matter what it was batched with.

The encoder runs in the worker thread (JAX releases the GIL while it computes), so the event loop goes on
accepting and tokenizing requests meanwhile.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from typing import Callable, Optional, Sequence

import numpy as np

from instructor_jax.encode.batch_encoder import BatchEncoder, padded_rows, plan_batches
from instructor_jax.model import packing
from instructor_jax.model.flops import layout_cost
from instructor_jax.model.tokenization import TokenizedPairs

log = logging.getLogger(__name__)


def longest_row(max_seq_length: int) -> int:
    return packing.row_lengths(max_seq_length)[-1]


def default_rows_per_batch(max_batch_tokens: int, max_seq_length: int, num_devices: int) -> int:
    """Rows of the longest row length per packed program: a quarter of `max_batch_tokens` in token slots (a
    batch of max_batch_tokens real tokens then runs as about four programs, and a partly filled last program
    wastes little), a multiple of the devices, at least one row per device."""
    rows = max_batch_tokens // 4 // longest_row(max_seq_length)
    return max(num_devices, rows // num_devices * num_devices)


class Programs:
    """The programs a batch may run, and which layout each batch takes.

    Two layouts, both with fixed row counts: packed (`packing_mode=True`, `rows_per_batch`), whose shapes
    are ("packed", row length, row count) over `packing.row_lengths(max_seq_length)` x
    `packing.row_counts(rows_in_batch(...))`; and padded (`packing_mode=False`, one row per device), whose
    shapes are ("padded", bucket, devices). A batch takes whichever computes less by the analytic cost
    `BatchEncoder.plan` also uses: padded wins for a few inputs (one input needs one row of its bucket per
    device, not a packed row of up to twice its length), packed for many. `normalize=False` always (the
    L2 norm is taken on the host), so these are all the programs there are."""

    def __init__(self, encoder: BatchEncoder, buckets: Sequence[int], rows_per_batch: int, max_seq_length: int):
        self.encoder = encoder
        self.buckets = tuple(sorted(buckets))
        self.rows_per_batch = rows_per_batch
        self.max_seq_length = max_seq_length
        self.devices = encoder.num_devices
        config = encoder.config
        self.cost = lambda rows: layout_cost(rows, config.encoder, config.head.dense_features)

    @property
    def compile_count(self) -> int:
        return self.encoder.compile_count

    def shapes(self) -> list[tuple[str, int, int]]:
        shapes = []
        for row_length in sorted(packing.row_lengths(self.max_seq_length), reverse=True):
            per_batch = packing.rows_in_batch(row_length, self.rows_per_batch, self.max_seq_length, self.devices)
            shapes += [("packed", row_length, count) for count in packing.row_counts(per_batch, self.devices)]
        return shapes + [("padded", bucket, self.devices) for bucket in reversed(self.buckets)]

    def programs_for(self, tokenized: TokenizedPairs, packed: bool) -> list[tuple[int, int]]:
        """(row length, row count) of each program `encode(tokenized, packed)` runs, from its plan."""
        if packed:
            _, plan, max_length = self.encoder.plan(tokenized, self.rows_per_batch, self.buckets, packing_mode=True)
            return [(length, packing.padded_row_count(len(rows), length, self.rows_per_batch, max_length, self.devices))
                    for length, rows in plan]
        lengths = tokenized.lengths
        return [(self.buckets[int(np.searchsorted(self.buckets, lengths[rows].max()))],
                 padded_rows(len(rows), self.devices, self.devices))
                for rows in plan_batches(tokenized, self.devices, self.buckets)]

    def layout_cost(self, programs: list[tuple[int, int]]) -> float:
        return self.cost(np.concatenate([np.full(count, length) for length, count in programs]))

    def packs(self, tokenized: TokenizedPairs) -> bool:
        """Whether these inputs run packed (else padded to their buckets): whichever costs less."""
        return (self.layout_cost(self.programs_for(tokenized, True))
                < self.layout_cost(self.programs_for(tokenized, False)))

    def planned(self, tokenized: TokenizedPairs, packed: bool) -> set[tuple[str, int, int]]:
        """The shapes `encode(tokenized, packed)` runs."""
        return {("packed" if packed else "padded", length, count)
                for length, count in self.programs_for(tokenized, packed)}

    def encode(self, tokenized: TokenizedPairs, packed: Optional[bool] = None) -> tuple[np.ndarray, int]:
        """(embeddings before the L2 norm, token slots computed)."""
        packed = self.packs(tokenized) if packed is None else packed
        out = self.encoder.encode(tokenized, self.rows_per_batch if packed else self.devices, self.buckets,
                                  normalize=False, packing_mode=packed)
        return out, self.encoder.last_plan.get("slots", 0)

    def warm_up_inputs(self, token_id: int) -> list[tuple[TokenizedPairs, bool]]:
        """(inputs, packed) whose plans, together, run every shape of `shapes()` (nothing is run here).

        Packed (R, c): c inputs of exactly R tokens (at most max_seq_length); each fills a row of R alone,
        and shorter rows cost less attention, so the plan puts them in c rows of R. Padded (b, devices): one
        input of b tokens. Each plan is checked: a shape no plan reaches is an error here rather than a
        compile while a request waits."""
        wanted = self.shapes()
        reached: set[tuple[str, int, int]] = set()
        calls = []
        for kind, length, count in wanted:
            if (kind, length, count) in reached:
                continue
            packed = kind == "packed"
            n = count if packed else 1
            tokenized = TokenizedPairs([np.full(min(length, self.max_seq_length), token_id, np.int32)] * n,
                                       np.zeros(n, np.int32), 0)
            reached |= self.planned(tokenized, packed)
            calls.append((tokenized, packed))
        missing = sorted(set(wanted) - reached)
        if missing:
            raise RuntimeError(f"warm-up would not reach the shapes {missing} (layout, row length, rows): a "
                               "request could wait for a compile; this is a bug")
        return calls

    def warm_up(self, token_id: int) -> None:
        """Compiles, and runs once, every program a batch can use."""
        for tokenized, packed in self.warm_up_inputs(token_id):
            self.encode(tokenized, packed)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """As the model's head (and torch.nn.functional.normalize): x / max(||x||, 1e-12), in float32."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


@dataclasses.dataclass(eq=False)
class Job:
    """One request's inputs on their way through the batcher. `on_done(job)` is called from the worker
    thread once every input has its embedding (in `out`) or the job failed (`error`)."""

    tokenized: TokenizedPairs
    normalize: bool
    on_done: Callable[["Job"], None]
    dim: int
    out: np.ndarray = dataclasses.field(init=False)
    lengths: np.ndarray = dataclasses.field(init=False)
    cursor: int = 0  # inputs before it have been taken into a batch
    remaining: int = 0  # inputs not yet embedded
    cancelled: bool = False
    error: Optional[BaseException] = None
    enqueued_at: float = 0.0
    started_at: Optional[float] = None  # when its first batch started

    def __post_init__(self):
        self.lengths = self.tokenized.lengths
        self.out = np.zeros((len(self.lengths), self.dim), np.float32)
        self.remaining = len(self.lengths)

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum())

    def untaken_tokens(self) -> int:
        return int(self.lengths[self.cursor:].sum())


@dataclasses.dataclass
class BatchStats:
    inputs: int
    tokens: int
    slots: int  # token slots computed, padding included
    seconds: float  # encode time
    queue_seconds: list[float]  # for each job whose first input this batch took: its time in the queue
    compiled: int  # programs compiled during this batch (0 once warmed up)


class Batcher:
    """The queue and its worker thread. `submit`, `cancel`, `stop` may be called from any thread."""

    def __init__(self, programs: Programs, max_batch_tokens: int, max_wait_s: float, normalizes: bool,
                 observer: Optional[Callable[[BatchStats], None]] = None):
        self.programs = programs
        self.max_batch_tokens = max_batch_tokens
        self.max_wait_s = max_wait_s
        self.normalizes = normalizes  # whether the model's head ends in an L2 norm
        self.observer = observer
        self.queue: deque[Job] = deque()
        self.queued_tokens = 0
        self.busy = False
        self.batches = 0
        self.cond = threading.Condition()
        self.stopping = False
        self.paused = False
        self.thread: Optional[threading.Thread] = None

    # ---------------------------------------------------------------------------------------------- API
    def start(self) -> None:
        self.thread = threading.Thread(target=self.work, name="instructor-jax-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                raise RuntimeError("the batcher has stopped")
            job.enqueued_at = time.monotonic()
            self.queue.append(job)
            self.queued_tokens += job.tokens
            self.cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drops the job's inputs not yet taken into a batch (a batch already running finishes)."""
        with self.cond:
            job.cancelled = True
            if job in self.queue:
                self.queue.remove(job)
                self.queued_tokens -= job.untaken_tokens()
            self.cond.notify_all()

    @property
    def queued_inputs(self) -> int:
        with self.cond:
            return sum(len(job.lengths) - job.cursor for job in self.queue)

    def idle(self) -> bool:
        with self.cond:
            return not self.queue and not self.busy

    def stop(self, timeout: Optional[float] = None) -> None:
        """Stops after the running batch; jobs still queued fail."""
        with self.cond:
            self.stopping = True
            self.paused = False
            left, self.queue = list(self.queue), deque()
            self.queued_tokens = 0
            self.cond.notify_all()
        for job in left:
            job.error = RuntimeError("the server stopped before this request was encoded")
            job.on_done(job)
        if self.thread is not None:
            self.thread.join(timeout)

    @contextlib.contextmanager
    def hold(self):
        """No batch starts inside this block (requests queue up): for tests and maintenance."""
        with self.cond:
            self.paused = True
        try:
            yield self
        finally:
            with self.cond:
                self.paused = False
                self.cond.notify_all()

    # ------------------------------------------------------------------------------------------ worker
    def work(self) -> None:
        while True:
            taken = self.take()
            if taken is None:
                return
            try:
                self.run(taken)
            finally:
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def take(self) -> Optional[list[tuple[Job, int, int]]]:
        """Blocks until a batch is due; returns (job, first input, end) slices, or None to stop."""
        with self.cond:
            while True:
                while not self.stopping and (self.paused or not self.queue):
                    self.cond.wait()
                if self.stopping:
                    return None
                deadline = time.monotonic() + self.max_wait_s
                while (self.queued_tokens < self.max_batch_tokens and not self.stopping and not self.paused
                       and (left := deadline - time.monotonic()) > 0):
                    self.cond.wait(left)
                if self.queue and not self.paused and not self.stopping:
                    self.busy = True
                    return self.slice_queue()

    def slice_queue(self) -> list[tuple[Job, int, int]]:
        """The head of the queue up to max_batch_tokens (at least one input); called holding the lock."""
        taken, tokens = [], 0
        while self.queue:
            job = self.queue[0]
            start = stop = job.cursor
            while stop < len(job.lengths) and (tokens == 0 or tokens + job.lengths[stop] <= self.max_batch_tokens):
                tokens += int(job.lengths[stop])
                stop += 1
            if stop > start:
                taken.append((job, start, stop))
                self.queued_tokens -= int(job.lengths[start:stop].sum())
                job.cursor = stop
            if job.cursor < len(job.lengths):
                break  # the budget is spent; the rest of this job goes in the next batch
            self.queue.popleft()
        return taken

    def run(self, taken: list[tuple[Job, int, int]]) -> None:
        start = time.monotonic()
        queue_seconds = []
        for job, _, _ in taken:
            if job.started_at is None:
                job.started_at = start
                queue_seconds.append(start - job.enqueued_at)
        ids = [ids for job, a, b in taken for ids in job.tokenized.input_ids[a:b]]
        tokenized = TokenizedPairs(ids, np.concatenate([job.tokenized.instruction_lengths[a:b] for job, a, b in taken]), 0)
        compiles = self.programs.compile_count
        try:
            out, slots = self.programs.encode(tokenized)
        except Exception as e:  # noqa: BLE001 - the batch's requests fail; the server goes on
            log.exception("encoding a batch of %d inputs failed", len(ids))
            for job, _, _ in taken:
                job.error = e
                job.on_done(job)
            return
        seconds = time.monotonic() - start
        compiled = self.programs.compile_count - compiles
        if compiled:
            log.warning("a batch compiled %d program(s) after warm-up: requests waited for it (a bug)", compiled)
        offset = 0
        for job, a, b in taken:
            values = out[offset:offset + b - a]
            offset += b - a
            job.out[a:b] = l2_normalize(values) if job.normalize and self.normalizes else values
            job.remaining -= b - a
            if job.remaining == 0:
                job.on_done(job)
        self.batches += 1
        if self.observer is not None:
            self.observer(BatchStats(len(ids), int(tokenized.lengths.sum()), slots, seconds, queue_seconds, compiled))
