"""`instructor-jax serve`: an HTTP embedding server for INSTRUCTOR (OpenAI- and text-embeddings-inference-
compatible routes, dynamic batching over the packed encoder, back-pressure, Prometheus metrics, drain on
SIGTERM).

Owns: the request and response schemas and their errors (`schemas`, `errors`), the dynamic batcher and the
programs it may run (`batcher`), the embedding service that admits, tokenizes and answers requests
(`service`), the ASGI app and its routes (`app`), the metrics (`metrics`), start-up and shutdown (`server`)
and the command's flags (`command`: `add_arguments`, `run`).

May import: `instructor_jax.runtime`, `.model`, `.checkpoints`, `.encode`, `.instructor`, `.evaluation`
(the instruction table), and the `serve` extra's packages (fastapi, uvicorn, prometheus-client), which only
`app`, `metrics` and `server` import. Nothing in the package imports `serve` but the command line.
"""
