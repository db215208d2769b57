"""Exact (and approximate) top-k search by inner product over a corpus sharded across a device mesh.

    from instructor_jax.search import search
    result = search(corpus, queries, k=10)      # corpus: [n, dim] numpy, or instructor_jax.open_embeddings(path)
    result.indices, result.scores, result.ids   # [q, k] rows of the corpus, their scores, their ids

Every device holds a slice of the corpus rows (no device holds the corpus), computes its own top-k for a
fixed-size batch of queries, and the per-device candidates are merged into the global top-k. Ties are broken
by corpus order: of two rows with the same score, the lower row comes first. In a multi-process job every
process places only its share of the rows on its devices and all processes get the same, merged result.
`approx=True` uses `jax.lax.approx_max_k` (fast on TPU; elsewhere an exact sort).

Owns: `topk` (the sharded search), `queries` (reading and encoding query files), `command` (the
`instructor-jax search` subcommand). May import `runtime`, `model`, `checkpoints`, `encode`,
`instructor_jax.instructor`, `evaluation` and `train`.
"""

__all__ = ["search", "SearchResult"]


def __getattr__(name):
    # Imported on first use: building the command line (which imports `search.command`) needs no JAX.
    if name in __all__:
        from instructor_jax.search import topk

        return getattr(topk, name)
    raise AttributeError(f"module 'instructor_jax.search' has no attribute {name!r}")
