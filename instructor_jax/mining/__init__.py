"""Training data from a user's own pairs: hard negatives mined with a model, and the INSTRUCTOR paper's
pairing recipe, written as MEDI JSONL that `instructor-jax train` reads as it is.

    instructor-jax data mine --model DIR --input PAIRS.jsonl --output MEDI.jsonl \\
        --query_instruction "Represent the question for retrieving answers: " \\
        --document_instruction "Represent the answer for retrieval: "

Owns: `pairs` (reading and checking the input files, grouping them by task), `hard_negatives`
(sentence-transformers' `mine_hard_negatives` semantics on embeddings, searched with `instructor_jax.search`),
`recipe` (Su et al. §2.3: `--recipe outputs` and `--recipe labels`), `output` (MEDI lines, the report, the
held-out evaluation task) and `command` (`instructor-jax data mine`). May import `runtime`, `model`,
`checkpoints`, `encode`, `instructor_jax.instructor`, `evaluation`, `train` and `search`.
"""
