"""`instructor-jax search`: exact (or approximate) top-k of each query over what `encode` wrote."""

from __future__ import annotations


def add_parser(commands) -> None:
    from instructor_jax.search import command

    search = commands.add_parser("search", help="the top-k corpus rows of each query (exact, sharded over the devices)")
    command.add_arguments(search)
    search.set_defaults(run=run)


def run(args) -> None:
    from instructor_jax.search import command

    code = command.run(args)
    if code:
        raise SystemExit(code)
