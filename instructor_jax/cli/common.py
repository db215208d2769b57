"""What several subcommands share: the pooling-rule flag, the multi-process flags and joining the other
processes."""

from __future__ import annotations

def add_pooling_rule_argument(parser) -> None:
    from instructor_jax.model.tokenization import POOLING_RULES

    parser.add_argument("--pooling_rule", choices=POOLING_RULES,
                        help="which tokens the mean pooling covers: 'instructor' (text only, InstructorEmbedding "
                             "1.0.1), 'sentence-transformers' (text only, prompt= semantics) or 'none' (the "
                             "instruction too, as GTR). Default: decided from the checkpoint's files, its hub id "
                             "or model card, else 'instructor'; a log line says which and why")


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

    plan = distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                  process_id=args.process_id)
    if plan.mode == "single":
        return 1
    import jax

    return jax.process_count()

