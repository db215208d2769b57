"""The training data pipeline: a training file opened as examples, single-task batches, tokenized (and
packed) batches, and a resumable grain pipeline. The files themselves are read by `medi` (JSON, JSONL,
ArrayRecord) and `tfds_medi` (TFDS).

Every training batch holds one task only: mixed-task batches make in-batch negatives trivial.

The pipeline is a `grain.MapDataset` indexed by global step, so it is deterministic, its state is just
the next step (`{"next_index": step}` plus a fingerprint of the settings), and every process walks the
same global batches and keeps its own rows: a checkpoint taken with P processes restores with any other
process count.
"""

from __future__ import annotations

import functools
import json
import logging
import pathlib
import threading
from typing import Callable, Sequence

import grain
import numpy as np

from instructor_jax.model import packing
from instructor_jax.model.tokenization import InstructionTokenizer, assign_buckets, default_buckets, pad_batch
from instructor_jax.runtime import fileio
from instructor_jax.train.medi import SKIP_BAD_HINT, Example, MediArrayRecordSource, Pair, read_medi

log = logging.getLogger(__name__)


ARRAY_RECORD_SUFFIXES = (".array_record", ".arrayrecord")


def open_examples(path, skip_bad: bool = False, tfds_data_dir: str | None = None, skip_hint: str = SKIP_BAD_HINT):
    """A training file as examples: 'tfds:NAME' (a TFDS dataset built by `instructor_jax.train.tfds_medi`, in
    `tfds_data_dir`), ArrayRecord (both random access, nothing parsed up front) or MEDI JSON/JSONL."""
    if str(path).startswith("tfds:"):
        # Imported here: tensorflow-datasets is an extra, and slow to import.
        from instructor_jax.train import tfds_medi

        return tfds_medi.TfdsMediSource(tfds_medi.parse_name(str(path)), data_dir=tfds_data_dir)
    if pathlib.PurePosixPath(str(path)).suffix in ARRAY_RECORD_SUFFIXES:
        if fileio.is_url(path):
            # array_record reads local files only (google/array_record#120).
            raise ValueError(f"{path}: ArrayRecord files are read from local paths only; copy it to each host's "
                             "disk or read it through a gcsfuse mount (MEDI .json/.jsonl files may be URLs)")
        return MediArrayRecordSource(path)
    return read_medi(path, skip_bad=skip_bad, skip_hint=skip_hint)


# ---------------------------------------------------------------------------------------------------------
# Single-task batches


def _tasks_of(examples) -> Sequence[str]:
    tasks = getattr(examples, "tasks", None)  # a source may know its tasks without reading every record
    return tasks if tasks is not None else [example.task for example in examples]


def task_chunks(tasks: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Full single-task chunks of example indices, unshuffled.

    Examples are grouped by task in order of first appearance, each task's examples in file order, and
    cut into chunks of exactly `batch_size`; each task's remainder is dropped. For a file whose tasks are
    contiguous (MEDI) this is what the reference does walking the file; unlike the reference, a task
    whose examples are interleaved with others' still fills whole batches.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    by_task: dict[str, list[int]] = {}
    for index, task in enumerate(tasks):
        by_task.setdefault(task, []).append(index)
    chunks, small, remainder = [], [], 0
    for task, indices in by_task.items():
        full = len(indices) // batch_size
        if not full:
            small.append(task)
        remainder += len(indices) - full * batch_size
        chunks += [np.asarray(indices[k * batch_size:(k + 1) * batch_size], np.int64) for k in range(full)]
    if small:
        log.warning("%d of %d tasks have fewer than batch_size=%d examples and are dropped: %s",
                    len(small), len(by_task), batch_size, ", ".join(small[:10]) + (" ..." if len(small) > 10 else ""))
    if remainder:
        log.info("%d examples that do not fill a single-task batch of %d are dropped", remainder, batch_size)
    return chunks


def _epoch_order(num_chunks: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(num_chunks)


def single_task_batches(examples, batch_size: int, seed: int) -> list[np.ndarray]:
    """Index arrays of full single-task batches (see `task_chunks`), in an order shuffled by `seed`."""
    chunks = task_chunks(_tasks_of(examples), batch_size)
    return [chunks[i] for i in _epoch_order(len(chunks), seed)]


# ---------------------------------------------------------------------------------------------------------
# Tokenized batches


class BatchTokenizer:
    """A global batch of Examples -> dict of int32 numpy arrays.

    query_ids/query_mask [B, Lq], query_instruction_lengths [B]; the same for pos_*; neg_ids/neg_mask
    [B, K, Ln] and neg_instruction_lengths [B, K] for the first K hard negatives of each example (an
    example with fewer is an error: K must fit every example). Each of query, pos and neg is padded to the
    smallest bucket that holds its longest sequence in the batch, so a training run compiles for at most
    len(buckets)**3 shapes. Safe to call from several threads.
    """

    def __init__(self, tokenizer: InstructionTokenizer, num_negatives: int = 0, buckets: Sequence[int] | None = None,
                 warn_truncation: bool = True):
        if num_negatives < 0:
            raise ValueError(f"num_negatives must be >= 0, got {num_negatives}")
        self.tokenizer = tokenizer
        self.num_negatives = num_negatives
        self.buckets = tuple(sorted(buckets or default_buckets(tokenizer.max_seq_length)))
        if self.buckets[-1] < tokenizer.max_seq_length:
            raise ValueError(f"the largest bucket {self.buckets[-1]} is shorter than max_seq_length="
                             f"{tokenizer.max_seq_length}; add a bucket of max_seq_length")
        self.warn_truncation = warn_truncation
        self.num_sequences = 0
        self.num_truncated = 0
        # transformers' fast tokenizers mutate their truncation settings on every call and fail
        # ("Already borrowed") when two threads call one at once.
        self._lock = threading.Lock()

    def _padded(self, pairs: list[Pair]):
        """ids and mask [N, bucket], instruction lengths [N]."""
        with self._lock:
            tokenized = self.tokenizer.tokenize(pairs, warn_truncation=False)
            self.num_sequences += len(pairs)
            before, self.num_truncated = self.num_truncated, self.num_truncated + tokenized.num_truncated
        if self.warn_truncation and _crosses_power_of_two(before, before + tokenized.num_truncated):
            # Warn at 1, 2, 4, 8, ... truncations: visible, but not once per step of a long run.
            log.warning("%d of %d sequences so far were longer than max_seq_length=%d tokens and were truncated",
                        before + tokenized.num_truncated, self.num_sequences, self.tokenizer.max_seq_length)
        longest = int(tokenized.lengths.max()) if pairs else 1
        length = self.buckets[int(assign_buckets(np.array([longest]), self.buckets)[0])]
        ids, mask = pad_batch(tokenized.input_ids, length)
        return ids, mask, tokenized.instruction_lengths

    def __call__(self, examples: Sequence[Example]) -> dict[str, np.ndarray]:
        b, k = len(examples), self.num_negatives
        for example in examples:
            if len(example.negs) < k:
                raise ValueError(f"an example of task {example.task!r} ({example.query[1][:60]!r}) has "
                                 f"{len(example.negs)} hard negatives but num_negatives={k}; lower "
                                 "num_negatives or drop such examples")
        batch = {}
        for name in ("query", "pos"):
            ids, mask, lengths = self._padded([getattr(e, name) for e in examples])
            batch.update({f"{name}_ids": ids, f"{name}_mask": mask, f"{name}_instruction_lengths": lengths})
        if k:
            ids, mask, lengths = self._padded([pair for e in examples for pair in e.negs[:k]])
        else:  # a zero-size K axis, so that batches have the same keys whatever K is
            ids = mask = np.zeros((0, self.buckets[0]), np.int32)
            lengths = np.zeros((0,), np.int32)
        length = ids.shape[-1]  # explicit: -1 cannot be inferred when K = 0
        batch.update({"neg_ids": ids.reshape(b, k, length), "neg_mask": mask.reshape(b, k, length),
                      "neg_instruction_lengths": lengths.reshape(b, k)})
        return batch


def _crosses_power_of_two(before: int, after: int) -> bool:
    return after > 0 and (before == 0 or after.bit_length() > before.bit_length())


PARTS = ("query", "pos", "neg")


def pack_batch(batch: dict[str, np.ndarray], max_seq_length: int, row_unit: int) -> dict[str, np.ndarray]:
    """A tokenized global batch (BatchTokenizer's layout) -> its sequences packed into rows.

    rows_ids, rows_segment_ids, rows_pool_mask [R, L] (see instructor_jax.model.packing; R a multiple of
    `row_unit`); query_slots and pos_slots [B, 2], neg_slots [B, K, 2]: (row, segment - 1) of each
    sequence, where its embedding is gathered from. Deterministic in the batch alone, so every process
    that tokenized the same global batch derives the same rows.
    """
    sequences, instruction_lengths, shapes = [], [], []
    for part in PARTS:
        ids, mask = batch[f"{part}_ids"], batch[f"{part}_mask"]
        shapes.append(ids.shape[:-1])
        flat_ids, real = ids.reshape(-1, ids.shape[-1]), mask.reshape(-1, mask.shape[-1]).sum(-1)
        sequences += [row[:n] for row, n in zip(flat_ids, real)]  # pad_batch pads on the right
        instruction_lengths.append(batch[f"{part}_instruction_lengths"].reshape(-1))
    packed = packing.pack_training_batch(sequences, np.concatenate(instruction_lengths), max_seq_length, row_unit)
    slots = np.zeros((len(sequences), 2), np.int32)
    slots[packed.inputs] = packed.slots
    out = {"rows_ids": packed.input_ids, "rows_segment_ids": packed.segment_ids, "rows_pool_mask": packed.pool_mask}
    offset = 0
    for part, shape in zip(PARTS, shapes):
        count = int(np.prod(shape))
        out[f"{part}_slots"] = slots[offset:offset + count].reshape(*shape, 2)
        offset += count
    return out


def process_share(batch: dict[str, np.ndarray], process_index: int, process_count: int) -> dict[str, np.ndarray]:
    """This process's contiguous share of every array's leading axis (rows of a packed batch, triples of
    an unpacked one); 0-d values (whole-batch counts) are kept whole."""
    share = {}
    for key, value in batch.items():
        if value.ndim == 0:
            share[key] = value
            continue
        if len(value) % process_count:
            raise ValueError(f"{key} has {len(value)} rows, which do not split over {process_count} processes")
        size = len(value) // process_count
        share[key] = value[process_index * size:(process_index + 1) * size]
    return share


def held_out_batches(examples, batch_size: int, tokenizer: InstructionTokenizer, num_negatives: int = 0,
                     buckets: Sequence[int] | None = None) -> list[dict[str, np.ndarray]]:
    """Tokenized full single-task batches for evaluation, in task order, unshuffled."""
    batcher = BatchTokenizer(tokenizer, num_negatives, buckets, warn_truncation=False)
    batches = [batcher([examples[i] for i in chunk]) for chunk in task_chunks(_tasks_of(examples), batch_size)]
    if batcher.num_truncated:
        log.warning("%d of %d held-out sequences are longer than max_seq_length=%d tokens and were truncated",
                    batcher.num_truncated, batcher.num_sequences, tokenizer.max_seq_length)
    return batches


# ---------------------------------------------------------------------------------------------------------
# The training pipeline


def make_train_dataset(examples, batch_size: int, tokenizer: InstructionTokenizer, num_negatives: int = 0,
                       seed: int = 0, process_index: int = 0, process_count: int = 1,
                       num_epochs: int | None = None, buckets: Sequence[int] | None = None,
                       transform: Callable[[dict], dict] | None = None) -> grain.MapDataset:
    """Global step -> this process's rows of that step's single-task batch, as a grain.MapDataset.

    Epoch e visits every full single-task chunk once, in the order `single_task_batches(examples,
    batch_size, seed + e)` gives; `num_epochs=None` repeats forever. Every process tokenizes the whole
    global batch, so that all pad to the same bucket (the global array needs one shape), and keeps rows
    [i*B/P, (i+1)*B/P): a batch stays single-task across hosts. `transform` (the trainer's packing) maps
    the whole tokenized global batch to another layout before each process takes its share of every array.
    """
    return _train_dataset(examples, batch_size, tokenizer, num_negatives, seed, process_index, process_count,
                          num_epochs, buckets, transform)[0]


def _train_dataset(examples, batch_size, tokenizer, num_negatives, seed, process_index, process_count,
                   num_epochs, buckets, transform=None) -> tuple[grain.MapDataset, int]:
    """`make_train_dataset`, and the number of batches in an epoch."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is not in [0, process_count={process_count})")
    if batch_size % process_count:
        raise ValueError(f"the global batch_size={batch_size} must be divisible by process_count={process_count}: "
                         "each process takes an equal slice of every single-task batch")
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be positive or None (forever), got {num_epochs}")
    chunks = task_chunks(_tasks_of(examples), batch_size)
    if not chunks:
        raise ValueError(f"no task has batch_size={batch_size} examples, so there is no single-task batch; "
                         "lower the batch size or add data")
    if isinstance(examples, list) and num_negatives:
        # Fail at start-up, not hours in, when some example lacks negatives.
        short = sum(len(examples[i].negs) < num_negatives for chunk in chunks for i in chunk)
        if short:
            raise ValueError(f"{short} examples have fewer than num_negatives={num_negatives} hard negatives; "
                             "lower num_negatives or drop such examples")
    batcher = BatchTokenizer(tokenizer, num_negatives, buckets)
    order = functools.lru_cache(maxsize=4)(lambda epoch: _epoch_order(len(chunks), seed + epoch))

    def local_batch(step: int, _) -> dict[str, np.ndarray]:
        epoch, position = divmod(step, len(chunks))
        chunk = chunks[order(epoch)[position]]
        batch = batcher([examples[int(i)] for i in chunk])
        return process_share(transform(batch) if transform else batch, process_index, process_count)

    steps = grain.MapDataset.range(len(chunks)).repeat(num_epochs)
    return steps.map_with_index(local_batch), len(chunks)


class TrainIterator(grain.DatasetIterator):
    """grain's iterator with the pipeline's settings in its state, so that restoring a state into a
    pipeline built differently (another seed, batch size or data) is an error, not silently other data."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: dict):
        super().__init__(parent)
        self.fingerprint = fingerprint

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {**self._parent.get_state(), "pipeline": dict(self.fingerprint)}

    def set_state(self, state: dict) -> None:
        state = dict(state)
        saved = state.pop("pipeline", None)
        if saved is not None and saved != self.fingerprint:
            raise ValueError(f"this iterator state was saved by a pipeline with {saved}, but this one has "
                             f"{self.fingerprint}; restore with the same data, batch size, seed and negatives")
        self._parent.set_state(state)


def make_train_iterator(examples, batch_size: int, tokenizer: InstructionTokenizer, num_negatives: int = 0,
                        seed: int = 0, process_index: int = 0, process_count: int = 1,
                        num_epochs: int | None = None, buckets: Sequence[int] | None = None,
                        read_options: grain.ReadOptions | None = None,
                        transform: Callable[[dict], dict] | None = None) -> TrainIterator:
    """A resumable iterator over this process's slices of single-task batches (see `make_train_dataset`).

    `get_state()` is a small JSON-serializable dict (the next global step and the pipeline's settings);
    `set_state()` resumes exactly there. Save it with Orbax next to the model as
    `grain.checkpoint.CheckpointSave(iterator)` (restore: `grain.checkpoint.CheckpointRestore(iterator)`),
    or with `save_iterator_state` / `restore_iterator_state`. The state does not depend on the process,
    so a run may resume with another process count, or with packing switched (`transform` changes a
    batch's layout, not which examples it holds). `read_options` defaults to one background thread
    tokenizing a few batches ahead.
    """
    dataset, batches_per_epoch = _train_dataset(examples, batch_size, tokenizer, num_negatives, seed,
                                                process_index, process_count, num_epochs, buckets, transform)
    read_options = read_options or grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
    fingerprint = {"num_examples": len(examples), "num_batches_per_epoch": batches_per_epoch,
                   "batch_size": batch_size, "seed": seed, "num_negatives": num_negatives}
    return TrainIterator(iter(dataset.to_iter_dataset(read_options)), fingerprint)


def save_iterator_state(iterator: grain.DatasetIterator, path) -> None:
    """Writes the iterator's state as JSON (what grain's Orbax handler writes, one file per process)."""
    pathlib.Path(path).write_text(json.dumps(iterator.get_state(), indent=2))


def restore_iterator_state(iterator: grain.DatasetIterator, path) -> grain.DatasetIterator:
    iterator.set_state(json.loads(pathlib.Path(path).read_text()))
    return iterator
