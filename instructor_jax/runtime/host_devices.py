"""On a machine whose JAX backend is its CPU: several CPU devices instead of one, so that encoding uses
every core (imports no JAX; runs when `instructor_jax` is imported).

Why: XLA:CPU runs a batched matmul on one thread. Attention is made of such products ([rows x heads] small
matrices, for its scores and its weighted sum), and they run at the same ~30 GFLOP/s on one core as on two
(measured on 2 cores; torch's run at 63). A batch split over several CPU devices runs as one program per
device, all at once, while the large matmuls still share all cores. Twice as many devices as cores does
better than one per core: while one device is in a single-threaded product, another's matmul fills the
cores. Measured with `tools/bench_encode.py --size small` on 2 cores, fp32, 192 texts, packed, against
sentence-transformers in the same run: mixed lengths 1.38x with 1 device, 1.76x with 2, 2.06x with 4;
short ones 0.95x, 1.32x and 1.28x.

What it does: asks XLA for `cpu_device_count()` host devices by adding
`--xla_force_host_platform_device_count=N` to `XLA_FLAGS`, and only where that cannot surprise:
- not where `XLA_FLAGS` already sets the count (tests, `launch/local_multiprocess.sh`, a user's choice);
- not once JAX's backends have started (the flag would be ignored, and the device count is fixed);
- `INSTRUCTOR_JAX_CPU_DEVICES=N` chooses the count (1: one device, as JAX's default gives).
On GPU and TPU machines the flag changes only the host platform's device count, which nothing here uses.

Encoding gains; training does not: the trainer's default mesh keeps one CPU device per process where the
count is this module's choice (`training_devices`). Measured with `tools/bench_train.py --lengths medi
--size small` (batch 8, 2 cores): packed, 464 real tokens/s on 1 device, 384 on 4, as the gradients'
all-reduce and the smaller per-device products cost more than the parallel attention gains.

The count is twice the usable cores, rounded down to a power of two (batch sizes are usually powers of two and
must split evenly over the devices), at most `MAX_CPU_DEVICES`: each device holds its own copy of the
parameters when encoding, so many devices cost memory (see `encoding.devices_that_fit`).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import MutableMapping, Optional

log = logging.getLogger(__name__)

ENV_CPU_DEVICES = "INSTRUCTOR_JAX_CPU_DEVICES"
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
MAX_CPU_DEVICES = 8

_chosen_here = False  # whether `configure` set the device count (rather than the user, in XLA_FLAGS or the variable)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # what this process may run on (taskset, cgroups' cpusets)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def power_of_two_at_most(n: int) -> int:
    """The largest power of two <= n (n >= 1): device counts that split power-of-two batches evenly."""
    return 1 << (n.bit_length() - 1)


def cpu_device_count(environ: MutableMapping[str, str] = os.environ, cores: Optional[int] = None) -> int:
    """The host devices to ask for: `INSTRUCTOR_JAX_CPU_DEVICES` if set, else twice the usable cores
    rounded down to a power of two, at most MAX_CPU_DEVICES."""
    chosen = environ.get(ENV_CPU_DEVICES, "").strip()
    if chosen:
        if not chosen.isdigit() or int(chosen) < 1:
            raise ValueError(f"{ENV_CPU_DEVICES} must be a positive integer (1 keeps JAX's single CPU device), "
                             f"got {chosen!r}")
        return int(chosen)
    twice = 2 * max(1, cores if cores is not None else usable_cores())
    return min(MAX_CPU_DEVICES, power_of_two_at_most(twice))


def _backends_started() -> bool:
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge

        return bool(xla_bridge.backends_are_initialized())
    except (ImportError, AttributeError):  # another JAX layout: assume the worst, change nothing
        return True


def configure(environ: MutableMapping[str, str] = os.environ) -> Optional[int]:
    """Adds the host device count to XLA_FLAGS where that is safe (see the module docstring); returns the
    count set, or None where nothing was changed."""
    flags = environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags or _backends_started():
        return None
    try:
        count = cpu_device_count(environ)
    except ValueError as error:
        log.warning("%s; keeping JAX's default CPU devices", error)
        return None
    environ["XLA_FLAGS"] = f"{flags} {DEVICE_COUNT_FLAG}={count}".strip()
    global _chosen_here
    _chosen_here = environ is os.environ and ENV_CPU_DEVICES not in environ
    log.debug("XLA_FLAGS += %s=%d (set %s=1 to keep one CPU device)", DEVICE_COUNT_FLAG, count, ENV_CPU_DEVICES)
    return count


def training_devices() -> Optional[list]:
    """The devices `train` uses when given none: None (all of them), except on a CPU backend whose device
    count `configure` chose: there the first device of each process (see the module docstring)."""
    if not _chosen_here:
        return None
    import jax

    if jax.default_backend() != "cpu":
        return None
    first: dict = {}
    for device in jax.devices():
        first.setdefault(device.process_index, device)
    return list(first.values())
