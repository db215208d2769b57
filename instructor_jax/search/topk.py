"""Top-k by inner product over a corpus sharded across the devices of a mesh.

The corpus rows are split into one contiguous slice per device, in mesh order (device 0 the first rows),
each slice padded to the same length (padding rows never score). For a batch of queries (replicated on every
device) each device computes its scores and its own top-k; the devices' candidates are all-gathered, in
device order, and one more top-k gives the global result. `jax.lax.top_k` puts the lower index first among
equal values, so within a device the lower row wins a tie, and across devices the lower device (the lower
rows): the result is the corpus-order tie-break of a stable sort by descending score.

Queries go in batches of a fixed size (the next power of two at least the query count, at most
`batch_size`), so a search compiles one program per (batch size, k, corpus slice length); slice lengths are
rounded up (a power of two below 4096 rows, else a multiple of 4096) so that corpora of similar sizes share
programs.

In a job of several processes (`jax.distributed`), the mesh spans every process's devices: each process
reads and places only the rows of its own devices (a memory-mapped corpus is read only there), the
all-gather crosses processes, and every process gets the whole merged result.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from instructor_jax.runtime import sharding

log = logging.getLogger(__name__)

ROW_QUANTUM = 4096  # slice lengths above this are rounded up to a multiple of it
_warned_approx_platforms: set = set()


@dataclasses.dataclass
class SearchResult:
    """The top-k of each query: corpus rows (`indices`, int64 [q, k]), their inner products (`scores`,
    float32 [q, k]), best first, and the rows' ids where the corpus has ids (else None)."""

    indices: np.ndarray
    scores: np.ndarray
    ids: Optional[list] = None


def slice_rows(rows: int, devices: int) -> int:
    """Rows per device for a corpus of `rows` over `devices`, rounded up (see the module docstring)."""
    per_device = max(1, math.ceil(rows / devices))
    if per_device <= ROW_QUANTUM:
        return 1 << (per_device - 1).bit_length()
    return math.ceil(per_device / ROW_QUANTUM) * ROW_QUANTUM


def device_dtype(dtype) -> np.dtype:
    """The dtype the corpus is kept in on the devices: 16-bit storage stays 16-bit (scores are computed in
    float32 all the same); anything else becomes float32."""
    dtype = np.dtype(dtype)
    if dtype == np.float16 or (dtype.itemsize == 2 and dtype.kind == "V") or dtype.name == "bfloat16":
        return dtype
    return np.dtype(np.float32)


class ShardedCorpus:
    """A corpus placed on a mesh, one slice of rows per device, ready for any number of searches.

    `corpus`: anything with `.shape == (rows, dim)` that a row slice of reads as numpy (a numpy array, a
    memory map, `instructor_jax.open_embeddings(...)`). Only the rows of this process's devices are read.
    """

    def __init__(self, corpus, mesh=None):
        shape = tuple(getattr(corpus, "shape", ()))
        if len(shape) != 2:
            raise ValueError(f"the corpus must be 2-D [rows, dim], got shape {shape}")
        if shape[0] == 0:
            raise ValueError("the corpus is empty: there is nothing to search; give a corpus with at least one row")
        self.rows, self.dim = int(shape[0]), int(shape[1])
        self.mesh = mesh if mesh is not None else sharding.make_mesh((-1, 1, 1))
        self.devices = self.mesh.size
        self.rows_per_device = slice_rows(self.rows, self.devices)
        self.dtype = device_dtype(corpus.dtype)
        padded = self.rows_per_device * self.devices
        self.sharding = NamedSharding(self.mesh, PartitionSpec(sharding.MESH_AXES, None))

        def read(index):
            rows = index[0]
            start, stop = rows.start or 0, padded if rows.stop is None else rows.stop
            block = np.zeros((stop - start, self.dim), self.dtype)
            if start < self.rows:
                block[:min(stop, self.rows) - start] = np.asarray(corpus[start:min(stop, self.rows)], self.dtype)
            return block

        self.array = jax.make_array_from_callback((padded, self.dim), self.sharding, read)

    def program(self, batch: int, k: int, approx: bool, recall_target: float):
        return _program(self.mesh, self.rows_per_device, self.rows, batch, k, approx, recall_target)


@functools.lru_cache(maxsize=64)
def _program(mesh, rows_per_device: int, rows: int, batch: int, k: int, approx: bool, recall_target: float):
    axes = sharding.MESH_AXES
    local_k = min(k, rows_per_device)

    def per_device(block, queries):
        scores = jnp.dot(queries, block.astype(jnp.float32).T, precision=jax.lax.Precision.HIGHEST)
        offset = jax.lax.axis_index(axes) * rows_per_device
        row = offset + jnp.arange(rows_per_device)
        scores = jnp.where(row[None, :] < rows, scores, -jnp.inf)
        if approx:
            values, local = jax.lax.approx_max_k(scores, local_k, recall_target=recall_target)
        else:
            values, local = jax.lax.top_k(scores, local_k)
        # Candidates of every device, in device order: [batch, devices * local_k].
        values = jax.lax.all_gather(values, axes, axis=1, tiled=True)
        candidates = jax.lax.all_gather(local + offset, axes, axis=1, tiled=True)
        best, where = jax.lax.top_k(values, k)
        return best, jnp.take_along_axis(candidates, where, axis=1)

    mapped = sharding.shard_map(per_device, mesh=mesh, in_specs=(PartitionSpec(axes, None), PartitionSpec()),
                                out_specs=(PartitionSpec(), PartitionSpec()))
    return jax.jit(mapped)


def query_batch_size(count: int, batch_size: int) -> int:
    """Queries per program call: the next power of two >= count, at most `batch_size` (itself rounded up to
    a power of two), so that few shapes are ever compiled."""
    if batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {batch_size}")
    return min(1 << (max(count, 1) - 1).bit_length(), 1 << (batch_size - 1).bit_length())


def _host(array) -> np.ndarray:
    """A replicated result as numpy (in a multi-process job: this process's own copy)."""
    return np.asarray(array.addressable_data(0))


def _warn_approx_fallback(mesh) -> None:
    platform = mesh.devices.flat[0].platform
    if platform != "tpu" and platform not in _warned_approx_platforms:
        _warned_approx_platforms.add(platform)
        log.warning("approx search on %s: jax.lax.approx_max_k has its fast approximate kernel on TPU only; here "
                    "it falls back to an exact sort (the results are exact, and no faster)", platform)


def check_k(k: int, rows: int, flag: str = "k") -> None:
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"{flag} must be a positive integer, got {k!r}")
    if k > rows:
        raise ValueError(f"{flag}={k} is above the corpus size ({rows} rows); ask for at most {rows}")


def check_unique_ids(ids: Sequence, what: str = "corpus") -> None:
    """Raises naming the first repeated id and both of its rows."""
    seen: dict = {}
    for row, name in enumerate(ids):
        if name in seen:
            raise ValueError(f"the {what} has the id {name!r} twice (rows {seen[name]} and {row}); ids must be "
                             "unique: fix the ids (or drop them to use row numbers)")
        seen[name] = row


def search(corpus, queries, k: int, *, approx: bool = False, recall_target: float = 0.95, batch_size: int = 256,
           ids: Optional[Sequence] = None, mesh=None) -> SearchResult:
    """The top-k rows of `corpus` by inner product with each of `queries` ([q, dim]), best first, ties to the
    lower row. `corpus` is a [rows, dim] array, an `open_embeddings` view (its ids are used) or a
    `ShardedCorpus` (placed once, searched many times). `ids` names the rows (default: the corpus's own
    ids, else none). Every process of a multi-process job calls it with the same arguments."""
    placed = corpus if isinstance(corpus, ShardedCorpus) else ShardedCorpus(corpus, mesh)
    if ids is None and not isinstance(corpus, ShardedCorpus) and getattr(corpus, "has_ids", False):
        ids = corpus.ids
    if ids is not None:
        if len(ids) != placed.rows:
            raise ValueError(f"{len(ids)} ids for a corpus of {placed.rows} rows")
        check_unique_ids(ids)
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2 or queries.shape[1] != placed.dim:
        raise ValueError(f"the queries must be [count, {placed.dim}] (the corpus's width), got shape {queries.shape}")
    if not np.isfinite(queries).all():
        raise ValueError(f"query {int(np.argwhere(~np.isfinite(queries))[0, 0])} holds a NaN or infinite value")
    check_k(k, placed.rows)
    if not 0 < recall_target <= 1:
        raise ValueError(f"recall_target must be in (0, 1], got {recall_target}")
    if approx:
        _warn_approx_fallback(placed.mesh)
    batch = query_batch_size(len(queries), batch_size)
    program = placed.program(batch, int(k), bool(approx), float(recall_target))
    replicated = NamedSharding(placed.mesh, PartitionSpec())
    indices = np.zeros((len(queries), k), np.int64)
    scores = np.zeros((len(queries), k), np.float32)
    for start in range(0, len(queries), batch):
        chunk = np.zeros((batch, placed.dim), np.float32)
        part = queries[start:start + batch]
        chunk[:len(part)] = part
        on_devices = jax.make_array_from_callback(chunk.shape, replicated, lambda index, c=chunk: c[index])
        best, rows = program(placed.array, on_devices)
        scores[start:start + len(part)] = _host(best)[:len(part)]
        indices[start:start + len(part)] = _host(rows)[:len(part)]
    names = None if ids is None else [[ids[i] for i in row] for row in indices.tolist()]
    return SearchResult(indices, scores, names)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    """The fraction of the exact top-k rows that `found` holds, averaged over queries."""
    found, exact = np.asarray(found), np.asarray(exact)
    if found.shape != exact.shape or exact.size == 0:
        raise ValueError(f"recall needs two [queries, k] arrays of one shape, got {found.shape} and {exact.shape}")
    hits = [len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())]
    return float(np.sum(hits) / exact.size)
