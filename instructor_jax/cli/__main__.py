"""`python -m instructor_jax.cli`: the `instructor-jax` command."""

from instructor_jax.cli import main

main()
