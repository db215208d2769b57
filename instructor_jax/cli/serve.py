"""`instructor-jax serve`: the HTTP embedding server (the serve extra)."""

from __future__ import annotations


def add_parser(commands) -> None:
    from instructor_jax.serve import command

    serve = commands.add_parser("serve", help="serve the model over HTTP (OpenAI and text-embeddings-inference "
                                              "routes, dynamic batching; the serve extra)")
    command.add_arguments(serve)
    serve.set_defaults(run=run)


def run(args) -> None:
    from instructor_jax.serve import command

    code = command.run(args)
    if code:
        raise SystemExit(code)
