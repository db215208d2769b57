"""Kept for code written against 0.1's README, which named `instructor_jax.corpus.open_embeddings`; the
corpus code lives in `instructor_jax.encode`, and `instructor_jax.open_embeddings` is the same function."""

from instructor_jax.encode.embedding_store import open_embeddings

__all__ = ["open_embeddings"]
