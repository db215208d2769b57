"""The command-line flags that make a command one process of a multi-process job, and joining the others.

Every multi-process command (train, encode, search, data mine) takes the same three flags, read here:
`--coordinator_address HOST:PORT --num_processes N --process_id I`, or the INSTRUCTOR_JAX_* variables, or
none (JAX's own detection on a Cloud TPU VM, in a SLURM step or an Open MPI job; else one process).
"""

from __future__ import annotations


def add_multiprocess_arguments(parser, what: str) -> None:
    """The flags that make a command one process of several (read by `join_processes`)."""
    multi = parser.add_argument_group(
        "multi-process", f"One process per host (or per GPU), all running the same command; each {what}. Give "
        "all three flags (or the INSTRUCTOR_JAX_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID environment "
        "variables; a flag and a variable that disagree are an error), or none: then JAX's own detection is used "
        "on a Cloud TPU VM, in a SLURM step of several tasks or an Open MPI job, and otherwise one process runs. "
        "See launch/README.md.")
    multi.add_argument("--coordinator_address", metavar="HOST:PORT",
                       help="address of process 0, reachable from every process, and a free port")
    multi.add_argument("--num_processes", type=int, metavar="N", help="number of processes in the job")
    multi.add_argument("--process_id", type=int, metavar="I", help="this process's index, 0 .. N-1")


def join_processes(args):
    """One process of several joins the others (`--coordinator_address/--num_processes/--process_id`, the
    INSTRUCTOR_JAX_* variables, or JAX's SLURM/Open MPI/TPU detection); a no-op for a single process. Must
    run before anything touches a JAX backend. Returns the number of processes."""
    from instructor_jax.runtime import distributed

    plan = distributed.initialize(coordinator_address=getattr(args, "coordinator_address", None),
                                  num_processes=getattr(args, "num_processes", None),
                                  process_id=getattr(args, "process_id", None))
    if plan.mode == "single":
        return 1
    import jax

    return jax.process_count()

