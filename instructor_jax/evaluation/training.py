"""Evaluation during training: `TrainConfig.eval_tasks` scored on the live parameters, without an export.

One process: the trainer's own sharded parameters are encoded on the trainer's mesh (no copy, no file).
Several processes: the parameters are gathered to the host by all (a collective), and process 0 alone runs
mteb on its local devices, so the tasks are evaluated once, not once per process; the others wait for it
at their next step.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional, Sequence

log = logging.getLogger(__name__)


def check_task_directories(specs: Sequence[str]) -> None:
    """Fails before any compute (no mteb import) if an entry is not a local task directory (or a directory
    of them) or a task gives no instruction: the trainer has no --instructions to fill it in."""
    from instructor_jax.evaluation.tasks import read_task_json, task_directories

    for spec in specs:
        for directory in task_directories(spec):
            if "instruction" not in read_task_json(directory):
                raise ValueError(f"TrainConfig.eval_tasks: {directory}/task.json has no \"instruction\" (a string, "
                                 "or {\"query\": ..., \"corpus\": ...}; \"\" for none)")


def make_task_evaluator(specs: Sequence[str], config, tokenizer, mesh, rules,
                        batch_size: int = 32) -> Callable[[dict], Optional[dict]]:
    """`evaluate(params)` -> {task: main score} on process 0, None on the others. Every process must call it."""
    import jax

    from instructor_jax.runtime import sharding
    from instructor_jax.encode.batch_encoder import BatchEncoder
    from instructor_jax.instructor import Instructor

    def evaluate(params) -> Optional[dict]:
        from instructor_jax.evaluation.encoder import MTEBEncoder
        from instructor_jax.evaluation.run import run_tasks
        from instructor_jax.evaluation.tasks import load_tasks

        if jax.process_count() > 1:
            params = sharding.gather_to_host(params)  # all processes take part in the all-gather
            if jax.process_index() != 0:
                return None
            model = Instructor(config, params, tokenizer)  # process 0's local devices
        else:
            model = Instructor(config, params, tokenizer)
            # The training mesh and rules: the parameters are already laid out so, and stay where they are.
            model._encoder = BatchEncoder(config, params, mesh=mesh, rules=rules)
        # Fresh task objects each time: mteb seeds its random state when a task is created, so scores at
        # different steps differ by the parameters alone.
        tasks = load_tasks(list(specs))
        return run_tasks(MTEBEncoder(model, name="training"), tasks, None, batch_size)

    return evaluate
