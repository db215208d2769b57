"""Jit-compiled, bucketed, sharded encoding of tokenized inputs.

Each input is padded to the smallest length bucket that holds it, judged by its own length alone, and
every batch has the same number of rows: so an input's embedding never depends on what else is in the
call, and the number of compiled programs is bounded by the number of buckets whatever the input.
Inputs are sorted by length so that batches fill with little padding. Batches are split over the data axes
of a device mesh (by default all local devices, parameters replicated; any mesh, parameters sharded by
the logical rules). Host-side padding runs in a background
thread and device work is dispatched asynchronously, with a few batches in flight, so the host prepares
batch i+1 while the device computes batch i.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from typing import Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from instructor_jax.model import packing
from instructor_jax.runtime import sharding
from instructor_jax.runtime.host_devices import power_of_two_at_most
from instructor_jax.model.config import InstructorConfig
from instructor_jax.model.flops import layout_cost
from instructor_jax.model.encoder import InstructorModel, param_shardings
from instructor_jax.model.tokenization import TokenizedPairs, assign_buckets, pad_batch

IN_FLIGHT = 2  # batches dispatched to the device before the host waits for the oldest
# CPU devices share one memory, and each holds its own copy of the parameters: the copies past the first
# may take at most this share of the memory available when the encoder is built.
REPLICA_MEMORY_SHARE = 0.5

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Batch:
    rows: np.ndarray  # positions of the real inputs in the caller's order
    input_ids: np.ndarray  # [batch_size, bucket]
    attention_mask: np.ndarray
    instruction_lengths: np.ndarray  # [batch_size]


def padded_rows(rows: int, batch_size: int, num_devices: int) -> int:
    """Rows a batch of `rows` inputs computes: the full batch, or for a bucket's last, short batch the
    smallest of num_devices x 2^k that holds it (a bounded set of shapes, not always the full batch)."""
    return next(c for c in packing.row_counts(batch_size, num_devices) if c >= rows)


def plan_batches(tokenized: TokenizedPairs, batch_size: int, buckets: Sequence[int]) -> list[np.ndarray]:
    """Row indices of each batch: grouped by bucket, sorted by length (longest first, so the largest
    compile and any out-of-memory error come at once, not at the end)."""
    lengths = tokenized.lengths
    which = assign_buckets(lengths, buckets)
    order = np.lexsort((-lengths, -which))
    batches = []
    for bucket in np.unique(which[order])[::-1]:
        members = order[which[order] == bucket]
        batches.extend(members[i:i + batch_size] for i in range(0, len(members), batch_size))
    return batches


def _bucket_of(tokenized: TokenizedPairs, rows: np.ndarray, buckets: Sequence[int]) -> int:
    buckets = sorted(buckets)
    return buckets[int(np.searchsorted(buckets, tokenized.lengths[rows].max()))]


def padded_batches(tokenized: TokenizedPairs, plan: list[np.ndarray], batch_size: int,
                   buckets: Sequence[int], num_devices: int = 1) -> Iterator[Batch]:
    for rows in plan:
        num_rows = padded_rows(len(rows), batch_size, num_devices)
        ids, mask = pad_batch([tokenized.input_ids[i] for i in rows], _bucket_of(tokenized, rows, buckets), num_rows)
        instruction_lengths = np.zeros((num_rows,), np.int32)
        instruction_lengths[:len(rows)] = tokenized.instruction_lengths[rows]
        yield Batch(rows, ids, mask, instruction_lengths)


def unpacked_row_lengths(tokenized: TokenizedPairs, plan: list[np.ndarray], batch_size: int,
                         buckets: Sequence[int], num_devices: int) -> np.ndarray:
    """The length of every row the unpacked plan computes, padding rows included."""
    return np.concatenate([np.full(padded_rows(len(rows), batch_size, num_devices),
                                   _bucket_of(tokenized, rows, buckets)) for rows in plan] or [np.zeros(0)])


def available_memory() -> Optional[int]:
    """Bytes of memory available now (Linux's MemAvailable), or None where that is not known."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def devices_that_fit(devices: Sequence, params, available: Optional[int] = None) -> list:
    """The devices a default encoder uses: all of them, except several CPU devices (see
    `instructor_jax.runtime.host_devices`), which share one memory: there as many, a power of two, as copies of
    `params` fit (REPLICA_MEMORY_SHARE of the available memory for the copies past the first), at least one."""
    devices = list(devices)
    if len(devices) < 2 or devices[0].platform != "cpu":
        return devices
    available = available_memory() if available is None else available
    if available is None:
        return devices
    copy_bytes = sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
    fit = power_of_two_at_most(min(len(devices), 1 + int(REPLICA_MEMORY_SHARE * available // max(copy_bytes, 1))))
    if fit < len(devices):
        log.info("encoding on %d of the %d CPU devices: a copy of the parameters per device (%.1f GB each) must "
                 "fit in %.0f%% of the %.1f GB available", fit, len(devices), copy_bytes / 1e9,
                 100 * REPLICA_MEMORY_SHARE, available / 1e9)
    return devices[:fit]


def prefetch(iterator: Iterator, size: int = 2) -> Iterator:
    """Runs `iterator` in a background thread, `size` items ahead (numpy padding releases the GIL often
    enough for this to overlap with device dispatch)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pending = collections.deque()
        sentinel = object()
        iterator = iter(iterator)
        for _ in range(size):
            pending.append(pool.submit(next, iterator, sentinel))
        while True:
            item = pending.popleft().result()
            if item is sentinel:
                return
            pending.append(pool.submit(next, iterator, sentinel))
            yield item


class BatchEncoder:
    """Holds the jitted encoder programs and the parameters, laid out on a mesh, for one model.

    The default mesh puts every local device on the data axis with the parameters replicated (the fast
    layout for encoding a model that fits one device); any (data, fsdp, model) mesh works, parameters
    then sharded by the logical axis rules.
    """

    def __init__(self, config: InstructorConfig, params, devices: Optional[Sequence] = None,
                 mesh: Optional[Mesh] = None, rules=sharding.DEFAULT_RULES):
        self.config = config
        self.mesh = mesh or sharding.make_mesh((-1, 1, 1), devices or devices_that_fit(jax.local_devices(), params))
        self.rules = rules
        self.batch_sharding = sharding.batch_sharding(self.mesh)
        self._source_params = params
        self._params = {}  # dtype name -> params on the mesh, cast once
        self._programs = {}  # (dtype name, packed, attention) -> jitted function
        self.compile_count = 0
        self.last_plan: dict = {}  # what the last encode did: packed or not, real tokens, computed slots

    @property
    def num_devices(self) -> int:
        """Devices the batch is split over (data x fsdp)."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]

    def _program(self, dtype: str, packed: bool = False, attention: Optional[str] = None):
        attention = attention or self.config.encoder.attention
        if (dtype, packed, attention) not in self._programs:
            encoder_cfg = dataclasses.replace(self.config.encoder, dtype=dtype, attention=attention).validate()
            module = InstructorModel(encoder_cfg, self.config.head)

            def forward(params, input_ids, attention_mask, instruction_lengths, normalize):
                self.compile_count += 1  # Python runs here only while tracing: this counts compilations.
                return module.apply({"params": params}, input_ids, attention_mask, instruction_lengths,
                                    normalize=normalize)

            def forward_packed(params, input_ids, segment_ids, pool_mask, max_segments, normalize):
                self.compile_count += 1
                return module.apply({"params": params}, input_ids, segment_ids, pool_mask, max_segments,
                                    normalize=normalize, method=InstructorModel.packed)

            with sharding.activate(self.mesh, self.rules):
                self._programs[dtype, packed, attention] = (
                    jax.jit(forward_packed, static_argnames=("max_segments", "normalize"),
                            out_shardings=sharding.batch_sharding(self.mesh, 3)) if packed
                    else jax.jit(forward, static_argnames=("normalize",), out_shardings=self.batch_sharding))
                if dtype not in self._params:
                    target = jnp.bfloat16 if dtype == "bfloat16" else None
                    cast = (lambda x: x.astype(target)) if target is not None else (lambda x: x)
                    self._params[dtype] = jax.device_put(jax.tree.map(cast, self._source_params),
                                                         param_shardings(module, self.mesh, self.rules))
        return self._programs[dtype, packed, attention], self._params[dtype]

    def round_batch_size(self, batch_size: int) -> int:
        """The batch must split evenly over the devices."""
        return -(-batch_size // self.num_devices) * self.num_devices

    def encode(self, tokenized: TokenizedPairs, batch_size: int, buckets: Sequence[int],
               normalize: bool = True, dtype: Optional[str] = None, show_progress_bar: bool = False,
               out: Optional[np.ndarray] = None, on_batch: Optional[Callable[[int], object]] = None,
               packing_mode: Optional[bool] = None, attention: Optional[str] = None) -> np.ndarray:
        """Embeddings [n, dim] float32 in input order (written into `out` if given). `on_batch(rows)` is
        called as each batch's results arrive (a caller's own progress bar).

        `packing_mode`: True packs several inputs per row (see instructor_jax.model.packing), False pads each
        input to its bucket, None (default) takes whichever plan computes fewer FLOPs for these inputs
        (counted analytically, attention included). Packed, an embedding depends on its neighbours only
        through float rounding; unpacked, it does not depend on them at all.

        `attention`: the attention implementation (instructor_jax.model.attention; default: the model's).
        """
        dtype = dtype or self.config.encoder.dtype
        batch_size = self.round_batch_size(batch_size)
        n = len(tokenized.input_ids)
        out = np.zeros((n, self.config.output_dim), np.float32) if out is None else out
        plan, packed_plan, max_length = self.plan(tokenized, batch_size, buckets, packing_mode)
        program, params = self._program(dtype, packed=packed_plan is not None, attention=attention)
        if packed_plan is not None:
            batches = packing.packed_batches(tokenized.input_ids, tokenized.instruction_lengths, packed_plan,
                                             batch_size, max_length, self.num_devices)
        else:
            batches = padded_batches(tokenized, plan, batch_size, buckets, self.num_devices)
        in_flight = collections.deque()
        with tqdm(total=n, disable=not show_progress_bar, desc="encoding", unit="text") as progress:
            def collect():
                batch, result = in_flight.popleft()
                result = np.asarray(result, dtype=np.float32)
                if isinstance(batch, packing.PackedBatch):
                    rows, values = batch.inputs, result[batch.slots[:, 0], batch.slots[:, 1]]
                else:
                    rows, values = batch.rows, result[:len(batch.rows)]
                out[rows] = values
                progress.update(len(rows))
                if on_batch is not None:
                    on_batch(len(rows))

            for batch in prefetch(batches):
                with sharding.activate(self.mesh, self.rules):
                    if isinstance(batch, packing.PackedBatch):
                        arrays = [self._put(a) for a in (batch.input_ids, batch.segment_ids, batch.pool_mask)]
                        result = program(params, *arrays, max_segments=batch.max_segments, normalize=normalize)
                    else:
                        arrays = [self._put(a) for a in (batch.input_ids, batch.attention_mask,
                                                         batch.instruction_lengths)]
                        result = program(params, *arrays, normalize=normalize)
                in_flight.append((batch, result))
                if len(in_flight) > IN_FLIGHT:
                    collect()
            while in_flight:
                collect()
        return out

    def plan(self, tokenized: TokenizedPairs, batch_size: int, buckets: Sequence[int],
             packing_mode: Optional[bool] = None):
        """(unpacked plan, packed plan or None, packed row length): how `encode` will batch these inputs.
        Records in `last_plan` whether it packs, the real tokens and the token slots it computes."""
        batch_size = self.round_batch_size(batch_size)
        lengths = tokenized.lengths
        plan = plan_batches(tokenized, batch_size, buckets)
        computed = unpacked_row_lengths(tokenized, plan, batch_size, buckets, self.num_devices)
        packed_plan, max_length = None, self.config.max_seq_length
        if packing_mode is not False and len(lengths):
            max_length = max(max_length, int(lengths.max()))
            head = self.config.head.dense_features

            def cost(rows):  # every row computed, padding included, attention weighted as it runs
                return layout_cost(rows, self.config.encoder, head)

            packed_plan = packing.plan_packed_batches(lengths, max_length, batch_size, self.num_devices, cost=cost)
            packed_rows = np.concatenate([np.full(packing.padded_row_count(len(rows), length, batch_size,
                                                                           max_length, self.num_devices), length)
                                          for length, rows in packed_plan])
            if packing_mode or cost(packed_rows) < cost(computed):
                computed = packed_rows
            else:
                packed_plan = None
        self.last_plan = {"packed": packed_plan is not None, "tokens": int(lengths.sum()),
                          "slots": int(computed.sum())}
        return plan, packed_plan, max_length

    def _put(self, array: np.ndarray):
        return jax.device_put(array, sharding.batch_sharding(self.mesh, array.ndim))
