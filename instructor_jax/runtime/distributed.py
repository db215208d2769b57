"""Multi-process start-up: `jax.distributed.initialize` with settings from flags, environment or the cluster.

    from instructor_jax import distributed
    distributed.initialize()                      # before anything touches jax.devices() or computes

Where the settings come from, first match wins:

1. explicit arguments (the `instructor-jax train` flags `--coordinator_address`, `--num_processes`,
   `--process_id`), merged with the environment variables `INSTRUCTOR_JAX_COORDINATOR_ADDRESS`,
   `INSTRUCTOR_JAX_NUM_PROCESSES` and `INSTRUCTOR_JAX_PROCESS_ID`. A flag and a variable that both give a
   setting must agree (a conflict is an error, not a silent win), and a multi-process setting must be
   complete: all three, or none. `num_processes == 1` means a single process;
2. JAX's own cluster detection (`jax.distributed.initialize()` with no arguments), used only where such a
   cluster is seen: a SLURM step of several tasks (SLURM_JOB_ID, SLURM_PROCID, ... and SLURM_NTASKS > 1),
   an Open MPI job of several ranks, or a Cloud TPU VM (libtpu sees TPU chips; a pod slice's workers find
   each other through the metadata server). `INSTRUCTOR_JAX_AUTO_DISTRIBUTED=0` turns this off;
3. otherwise nothing: a single process, which is what every run on one machine is.

Several processes on the CPU backend need cross-process collectives: gloo is set unless "mpi" was chosen
(it is already the default in JAX 0.10; some older versions default to none). The setting affects the CPU
backend only. Calling `initialize` again is a no-op.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
from typing import Mapping, Optional, Sequence

import jax

log = logging.getLogger(__name__)

ENV_COORDINATOR_ADDRESS = "INSTRUCTOR_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "INSTRUCTOR_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "INSTRUCTOR_JAX_PROCESS_ID"
ENV_AUTO = "INSTRUCTOR_JAX_AUTO_DISTRIBUTED"  # "0": never use JAX's cluster auto-detection

# (argument, flag, environment variable): the three settings of an explicit multi-process run.
_SETTINGS = (
    ("coordinator_address", "--coordinator_address", ENV_COORDINATOR_ADDRESS),
    ("num_processes", "--num_processes", ENV_NUM_PROCESSES),
    ("process_id", "--process_id", ENV_PROCESS_ID),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `initialize` does. mode: "single" (nothing), "explicit" (the settings below) or "auto" (JAX
    detects the cluster named in `source`); source says where the settings came from."""

    mode: str
    source: str
    coordinator_address: Optional[str] = None
    num_processes: Optional[int] = None
    process_id: Optional[int] = None
    local_device_ids: Optional[tuple] = None


def _int(value, what: str) -> int:
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _check_address(address: str, what: str) -> str:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{what} must be HOST:PORT (for example 10.0.0.1:1234), got {address!r}")
    return address.strip()


def _merge(name: str, flag: str, env_name: str, value, environ: Mapping[str, str]):
    """(value, source) of one setting from its flag and its environment variable; a conflict is an error."""
    env_value = environ.get(env_name, "").strip() or None
    if name != "coordinator_address":
        value = None if value is None else _int(value, flag)
        env_value = None if env_value is None else _int(env_value, f"${env_name}")
    else:
        value = None if value is None else _check_address(value, flag)
        env_value = None if env_value is None else _check_address(env_value, f"${env_name}")
    if value is not None and env_value is not None and value != env_value:
        raise ValueError(f"{flag}={value} conflicts with the environment variable {env_name}={env_value}; "
                         f"give the setting once (unset {env_name} or drop {flag}) or make them agree")
    if value is not None:
        return value, flag
    if env_value is not None:
        return env_value, f"${env_name}"
    return None, None


def _slurm_tasks(environ: Mapping[str, str]) -> int:
    """Tasks of the current SLURM step where JAX's SLURM detection would apply, else 0."""
    needed = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if not all(environ.get(k) for k in needed):
        return 0
    try:
        ntasks = int(environ["SLURM_NTASKS"])
        step_tasks = int(environ.get("SLURM_STEP_NUM_TASKS", ntasks))
    except ValueError:
        return 0
    if step_tasks != ntasks:
        # JAX counts SLURM_NTASKS processes; a step with fewer (srun -n 1 inside a larger allocation) would
        # wait forever for the others. Such a step is run as a single process here.
        log.warning("SLURM_STEP_NUM_TASKS=%d differs from SLURM_NTASKS=%d: not using SLURM auto-detection; "
                    "pass --num_processes/--process_id/--coordinator_address for a multi-process step",
                    step_tasks, ntasks)
        return 0
    return ntasks


def _on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM with libtpu (JAX decides this at import, from the PCI bus, touching no backend)."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # pragma: no cover - a JAX without the module
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def detect_cluster(environ: Optional[Mapping[str, str]] = None, on_tpu_vm: Optional[bool] = None) -> Optional[str]:
    """The cluster JAX's `initialize()` would auto-detect here ("slurm", "openmpi", "tpu"), or None."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV_AUTO, "").strip().lower() in ("0", "false", "no", "off"):
        return None
    if _slurm_tasks(environ) > 1:
        return "slurm"
    if environ.get("OMPI_MCA_orte_hnp_uri") and _int(environ.get("OMPI_COMM_WORLD_SIZE", "1"),
                                                     "$OMPI_COMM_WORLD_SIZE") > 1:
        return "openmpi"
    if _on_cloud_tpu_vm() if on_tpu_vm is None else on_tpu_vm:
        # A single-host TPU VM is found to be one process; a pod slice's workers find each other.
        return "tpu"
    return None


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None,
            environ: Optional[Mapping[str, str]] = None, on_tpu_vm: Optional[bool] = None) -> Plan:
    """The plan for these arguments and this environment; raises ValueError on conflicting or partial settings."""
    environ = os.environ if environ is None else environ
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    values, sources = {}, {}
    for name, flag, env_name in _SETTINGS:
        values[name], sources[name] = _merge(name, flag, env_name, given[name], environ)
    device_ids = None if local_device_ids is None else tuple(int(i) for i in local_device_ids)
    present = {k for k, v in values.items() if v is not None}
    source = ", ".join(s for s in sources.values() if s)

    if values["num_processes"] is not None and values["num_processes"] < 1:
        raise ValueError(f"the number of processes ({sources['num_processes']}) must be >= 1, "
                         f"got {values['num_processes']}")
    if values["num_processes"] == 1:
        if values["process_id"] not in (None, 0):
            raise ValueError(f"process id {values['process_id']} ({sources['process_id']}) is out of range for "
                             f"a single process")
        return Plan("single", source, None, 1, 0, device_ids)
    if present:
        missing = [f"{flag} (or ${env_name})" for name, flag, env_name in _SETTINGS if values[name] is None]
        if missing:
            have = ", ".join(f"{sources[k]}={values[k]}" for k in sorted(present))
            raise ValueError(f"incomplete multi-process settings: {have} is given but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} missing; give all three, or none to run "
                             f"a single process (or to let JAX detect a SLURM/TPU cluster)")
        if not 0 <= values["process_id"] < values["num_processes"]:
            raise ValueError(f"the process id ({sources['process_id']}={values['process_id']}) must be in "
                             f"[0, {values['num_processes']})")
        return Plan("explicit", source, values["coordinator_address"], values["num_processes"],
                    values["process_id"], device_ids)
    cluster = detect_cluster(environ, on_tpu_vm)
    if cluster is not None:
        return Plan("auto", cluster, local_device_ids=device_ids)
    return Plan("single", "no multi-process settings or cluster found", local_device_ids=device_ids)


_initialized: Optional[Plan] = None


def _jax_distributed_is_initialized() -> bool:
    check = getattr(jax.distributed, "is_initialized", None)
    if check is not None:
        return bool(check())
    from jax._src import distributed as _distributed  # older JAX

    return _distributed.global_state.client is not None


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, local_device_ids: Optional[Sequence[int]] = None) -> Plan:
    """Starts JAX's distributed runtime when this is one process of several; returns what was done.

    Call it before anything initializes a JAX backend (jax.devices(), a computation). A second call is a
    no-op that returns the first call's plan (and checks that explicit arguments agree with it).
    """
    global _initialized
    if _initialized is not None:
        if any(v is not None for v in (coordinator_address, num_processes, process_id)):
            again = resolve(coordinator_address, num_processes, process_id, local_device_ids)
            fields = ("coordinator_address", "num_processes", "process_id")
            differs = again.mode != _initialized.mode or (
                again.mode == "explicit" and any(getattr(again, f) != getattr(_initialized, f) for f in fields))
            if _initialized.mode != "external" and differs:
                raise ValueError(f"distributed.initialize already ran as {_initialized}; it cannot be redone "
                                 f"as {again} in the same process")
        return _initialized
    plan = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if _jax_distributed_is_initialized():
        log.info("jax.distributed was already initialized elsewhere; leaving it as it is")
        _initialized = Plan("external", "jax.distributed.initialize called elsewhere")
        return _initialized
    if plan.mode == "single":
        log.debug("single process (%s)", plan.source)
        _initialized = plan
        return plan

    if getattr(jax.config, "jax_cpu_collectives_implementation", None) not in ("mpi", "megascale"):
        # Cross-process collectives on the CPU backend (the only backend this setting affects).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if plan.local_device_ids is not None:
        kwargs["local_device_ids"] = list(plan.local_device_ids)
    if plan.mode == "explicit":
        kwargs.update(coordinator_address=plan.coordinator_address, num_processes=plan.num_processes,
                      process_id=plan.process_id)
        if "cluster_detection_method" in inspect.signature(jax.distributed.initialize).parameters:
            # Our settings as given: otherwise JAX, seeing SLURM, would also restrict each process to one
            # GPU (SLURM_LOCALID), which is wrong for one process per node.
            kwargs["cluster_detection_method"] = "deactivate"
    log.info("initializing jax.distributed (%s, from %s)", plan.mode, plan.source)
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as e:
        if "before any JAX" in str(e):
            raise RuntimeError(f"{e} (instructor_jax.runtime.distributed.initialize must run first)") from e
        raise
    _initialized = plan
    log.info("process %d of %d: %d local devices, %d devices in all (%s)", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count(), jax.devices()[0].platform)
    return plan
