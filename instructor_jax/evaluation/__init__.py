"""Evaluation with mteb 2.x (the `mteb` extra; Python >= 3.11): INSTRUCTOR's MTEB protocol.

    from instructor_jax import Instructor
    from instructor_jax.evaluation import MTEBEncoder, load_tasks, evaluate
    model = Instructor.from_pretrained("runs/tiny/model")
    summary = evaluate(MTEBEncoder(model, instructions="hkunlp/instructor-large"), load_tasks(["STS12"]), "out")

- `instructions`: per-task instructions (the reference's table, user JSON or dicts) and their lookup;
- `tasks`: local tasks of every mteb type from JSONL directories, loaded as real mteb task objects;
- `encoder`: `MTEBEncoder`, the mteb model over `Instructor.encode`;
- `run`: running tasks, mteb's results layout, the summary table, comparisons, paraphrase robustness.

Only `instructions` imports without mteb; the rest import it on first use.
"""

from instructor_jax.evaluation.instructions import (BUNDLED_PARAPHRASES, BUNDLED_TASKS, LEADERBOARD,
                                                    MissingInstruction, instruction_for, load_instructions)

__all__ = ["BUNDLED_PARAPHRASES", "BUNDLED_TASKS", "LEADERBOARD", "MissingInstruction", "MTEBEncoder",
           "compare", "evaluate", "instruction_for", "load_instructions", "load_local_task", "load_tasks",
           "paraphrase_robustness"]


def __getattr__(name):
    # mteb takes ~10 s to import and needs Python >= 3.11: only what uses it loads it.
    if name == "MTEBEncoder":
        from instructor_jax.evaluation.encoder import MTEBEncoder

        return MTEBEncoder
    if name in ("load_local_task", "load_tasks"):
        from instructor_jax.evaluation import tasks

        return getattr(tasks, name)
    if name in ("evaluate", "compare", "paraphrase_robustness"):
        from instructor_jax.evaluation import run

        return getattr(run, name)
    raise AttributeError(name)
