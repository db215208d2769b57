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


def resolve_mesh_shape(mesh_shape: Sequence[int], num_devices: int, name: str = "mesh_shape",
                       unit: str = "devices") -> tuple[int, ...]:
    """Fills one -1 entry with the devices (or, for dcn_mesh_shape, granules) left over; checks the product."""
    shape = list(mesh_shape)
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"{name} needs one entry per axis {MESH_AXES}, got {tuple(mesh_shape)}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one {name} entry may be -1, got {tuple(mesh_shape)}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        if num_devices % known:
            raise ValueError(f"{name} {tuple(mesh_shape)} does not divide {num_devices} {unit}")
        shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices:
        raise ValueError(f"{name} {tuple(shape)} needs {math.prod(shape)} {unit}, but there are {num_devices}")
    return tuple(shape)


def slices_are_granules(devices) -> bool:
    """Whether the devices span several TPU slices (multi-slice); if not, processes are the granules that
    a slow (DCN) network joins: GPU nodes, or hosts. (CPU and GPU devices name slice 0, or none.)"""
    return len({getattr(d, "slice_index", None) for d in devices}) > 1


def granule_of(device, by_slice: bool) -> int:
    return device.slice_index if by_slice else device.process_index


def make_mesh(mesh_shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence] = None,
              dcn_mesh_shape: Optional[Sequence[int]] = None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default: all devices of all processes).

    `dcn_mesh_shape` splits each axis further across granules (slices or processes) joined by the slower
    data-centre network: axis i then has mesh_shape[i] x dcn_mesh_shape[i] devices, laid out so that
    collectives within a granule stay on the fast interconnect, e.g. (2, 1, 1) over two TPU slices:
    data parallelism across them, whatever `mesh_shape` does inside each. -1 entries are allowed in both.
    """
    devices = list(devices if devices is not None else jax.devices())
    # Auto axes: sharding follows the logical rules and XLA's propagation (JAX >= 0.9 defaults to Explicit).
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    if dcn_mesh_shape is not None:
        from jax.experimental import mesh_utils

        by_slice = slices_are_granules(devices)
        granules = {granule_of(d, by_slice) for d in devices}
        dcn = resolve_mesh_shape(dcn_mesh_shape, len(granules), "dcn_mesh_shape", "slices" if by_slice else "processes")
        per_granule = resolve_mesh_shape(mesh_shape, len(devices) // len(granules))
        array = mesh_utils.create_hybrid_device_mesh(per_granule, dcn, devices, process_is_granule=not by_slice)
        try:
            return Mesh(array, MESH_AXES, axis_types=axis_types)
        except TypeError:  # older JAX without axis_types
            return Mesh(array, MESH_AXES)
    shape = resolve_mesh_shape(mesh_shape, len(devices))
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


def shard_map(fn, *, mesh, in_specs, out_specs):
    """`fn` run by each device on its shard, without the replication check: jax.shard_map (JAX >= 0.7), or
    on the older JAX that setup.cfg still allows, jax.experimental.shard_map's (the check has another name)."""
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
    from jax.experimental.shard_map import shard_map as experimental_shard_map

    return experimental_shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
