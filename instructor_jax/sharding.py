"""Meshes and t5x-style logical axis rules.

Every parameter and main activation of the model carries logical axis names (`vocab`, `embed`, `heads`,
`kv`, `mlp`, `batch`, `length`, ...). Rules map those names to the axes of a device mesh
(`data`, `fsdp`, `model`), so the same model runs data-parallel, fully sharded or tensor-parallel by
changing the mesh shape and the rules alone, never the model code.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")

# logical name -> mesh axis (or axes). The batch splits over data and fsdp; parameters split their
# `embed` dimension over fsdp (ZeRO-3 style) and their vocab/heads/mlp dimensions over model (Megatron
# style). Names not listed stay replicated.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "model"),
    ("heads", "model"),
    ("mlp", "model"),
    ("embed", "fsdp"),
    ("kv", None),
    ("length", None),
    ("relpos_buckets", None),
    ("dense", None),
    ("layers", None),  # the stacked layer axis of scan_layers: every device holds all layers of its shard
)


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Fills one -1 entry with the devices left over; checks the product."""
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"mesh_shape needs one entry per axis {MESH_AXES}, got {tuple(mesh_shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh_shape entry may be -1, got {tuple(mesh_shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"mesh_shape {tuple(mesh_shape)} does not divide {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"mesh_shape {tuple(shape)} needs {math.prod(shape)} devices, but there are {num_devices}")
    return tuple(shape)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence] = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = resolve_mesh_shape(mesh_shape, len(devices))
    # Auto axes: sharding follows the logical rules and XLA's propagation (JAX >= 0.9 defaults to Explicit).
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    except TypeError:  # older JAX without axis_types / devices keywords
        return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def logical_shardings(abstract_boxed, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of `nn.Partitioned` boxes (e.g. `jax.eval_shape(model.init, ...)`)."""
    return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_boxed), mesh, rules)


def batch_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Leading axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def gather_to_host(tree):
    """Every array of `tree` as one numpy array, whole. Arrays sharded across processes are all-gathered,
    so in a multi-process run every process must call this, even those that will not use the result."""
    from jax.experimental import multihost_utils

    return jax.tree.map(lambda x: np.asarray(x if x.is_fully_addressable
                                             else multihost_utils.process_allgather(x, tiled=True)), tree)


@contextlib.contextmanager
def activate(mesh: Mesh, rules=DEFAULT_RULES):
    """Makes `mesh` and `rules` current, so the model's logical constraints take effect while tracing."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
