"""Kept for launch scripts written against 0.1's docs, which named `instructor_jax.distributed.initialize`;
the multi-process start-up lives in `instructor_jax.runtime.distributed`."""

from instructor_jax.runtime.distributed import initialize

__all__ = ["initialize"]
