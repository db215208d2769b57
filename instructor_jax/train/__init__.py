"""Training: MEDI data (JSON/JSONL, ArrayRecord, TFDS) into single-task batches through a resumable grain
pipeline, the contrastive losses, GradCache, the train step and its packed layout, and the loop that
checkpoints, evaluates and exports.

May import `runtime`, `model`, `checkpoints`, `encode`, `instructor_jax.instructor` (the public encoder) and
`evaluation`.
"""
