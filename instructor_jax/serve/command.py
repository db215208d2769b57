"""`instructor-jax serve`: its flags (`add_arguments`) and what it runs (`run`).

    instructor-jax serve --model hkunlp/instructor-large [--host 127.0.0.1] [--port 8080]
    python -m instructor_jax.serve.command --model DIR ...      # the same, without the command line's wrapper
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
from typing import Optional

API_KEY_ENV = "INSTRUCTOR_JAX_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from instructor_jax.checkpoints.pooling_evidence import add_pooling_rule_argument

    parser.add_argument("--model", required=True, help="a model directory (sentence-transformers, instructor-jax) "
                        "or a Hugging Face hub id such as hkunlp/instructor-large")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                        "machine only; 0.0.0.0 for every interface, with --api_key)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: a free one, printed at start-up)")
    parser.add_argument("--served_model_name", help="the name clients send as `model` (default: the hub id, or "
                        "the directory's name; the --model string itself is accepted too)")
    add_pooling_rule_argument(parser)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"),
                        help="parameter and compute precision (default: the checkpoint's)")
    batching = parser.add_argument_group("batching")
    batching.add_argument("--max_batch_tokens", type=int, default=16384,
                          help="real tokens per batch (default 16384); a larger request is split over batches")
    batching.add_argument("--max_wait_ms", type=float, default=5.0,
                          help="how long a free encoder waits for a batch to fill (default 5 ms)")
    batching.add_argument("--rows_per_batch", type=int,
                          help="rows of the longest packed row length per program (default: max_batch_tokens / 4 "
                               "in token slots, a multiple of the devices); fewer, larger programs with a larger value")
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max_concurrent_requests", type=int, default=1024,
                        help="inputs in flight (accepted, not yet answered); beyond it 429 with Retry-After "
                             "(default 1024)")
    limits.add_argument("--max_client_batch_size", type=int,
                        help="inputs per request; beyond it 413 (default 256, or --max_concurrent_requests if lower)")
    limits.add_argument("--max_body_bytes", type=int, default=4 << 20,
                        help="request body size; beyond it 413 (default 4 MiB)")
    parser.add_argument("--api_key", default=os.environ.get(API_KEY_ENV) or None,
                        help=f"require `Authorization: Bearer KEY` on every route but /health and /metrics (default: "
                             f"${API_KEY_ENV}; prefer the variable: a flag shows in the process list)")
    parser.add_argument("--drain_s", type=float, default=30.0,
                        help="on SIGTERM, how long to go on answering accepted requests before exiting (default 30)")
    parser.add_argument("--instructions", help="the instruction table `prompt_name` looks tasks up in: one of the "
                        "reference's (hkunlp/instructor-base, -large, -xl) or a JSON file of task -> instruction "
                        "(default: the served model's own table if it is one of those, else hkunlp/instructor-large)")
    parser.add_argument("--default_instruction", default="",
                        help="the instruction of inputs sent without one (default: none, '')")


def served_name(model: str, given: Optional[str]) -> str:
    if given:
        return given
    path = pathlib.Path(model).expanduser()
    return path.resolve().name if path.exists() else model


def run(args) -> int:
    """Loads the model, serves until SIGTERM; returns the exit code (0 after a drain)."""
    from instructor_jax.instructor import Instructor
    from instructor_jax.serve.server import serve
    from instructor_jax.serve.service import EmbeddingService, Limits

    serve_log = logging.getLogger("instructor_jax.serve")
    if not logging.getLogger().handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    serve_log.setLevel(logging.INFO)  # the URL, the model, the limits, readiness: one line each
    logging.getLogger("instructor_jax.checkpoints.pooling_evidence").setLevel(logging.INFO)
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be 0 to 65535, got {args.port}")
    if args.drain_s < 0:
        raise ValueError(f"--drain_s must be at least 0, got {args.drain_s}")
    limits = Limits(max_batch_tokens=args.max_batch_tokens, max_wait_ms=args.max_wait_ms,
                    max_concurrent_requests=args.max_concurrent_requests,
                    max_client_batch_size=args.max_client_batch_size or min(256, args.max_concurrent_requests),
                    max_body_bytes=args.max_body_bytes,
                    rows_per_batch=args.rows_per_batch)
    model = Instructor.from_pretrained(args.model, dtype=args.dtype, pooling_rule=args.pooling_rule)
    service = EmbeddingService(model, served_name(args.model, args.served_model_name), limits,
                               instructions=args.instructions, default_instruction=args.default_instruction,
                               aliases=(args.model,))
    return serve(service, args.host, args.port, args.api_key, args.drain_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="instructor-jax serve", description="An embedding server for INSTRUCTOR "
                                     "(OpenAI- and text-embeddings-inference-compatible routes).")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (ValueError, OSError) as e:
        print(f"instructor-jax serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
