"""The embedding service behind the routes: limits and admission, tokenization off the event loop, the
batcher, warm-up, readiness and drain (no web framework imported here).

Admission counts inputs in flight (accepted, not yet answered): a request that would take them past
`max_concurrent_requests` gets 429 with Retry-After (an estimate from the recent throughput), so memory
stays bounded whatever the offered load. One tokenizer thread (a Rust tokenizer may not be called from
two threads at once) tokenizes while the event loop goes on; an asyncio future per request is settled from
the batcher's thread. A request whose client disconnects has its inputs dropped from the queue.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import math
import time
from typing import Awaitable, Callable, Optional

import numpy as np

from instructor_jax.encode.batch_encoder import BatchEncoder
from instructor_jax.evaluation.instructions import instruction_for, load_instructions
from instructor_jax.instructor import Instructor
from instructor_jax.model.tokenization import TokenizedPairs, join_instruction
from instructor_jax.serve import batcher as batching
from instructor_jax.serve.errors import ApiError, ClientGone
from instructor_jax.serve.metrics import Metrics

log = logging.getLogger(__name__)

DEFAULT_TABLE = "hkunlp/instructor-large"
REFERENCE_TABLES = ("hkunlp/instructor-base", "hkunlp/instructor-large", "hkunlp/instructor-xl")


@dataclasses.dataclass
class Limits:
    max_batch_tokens: int = 16384  # real tokens per batch (text-embeddings-inference's default)
    max_wait_ms: float = 5.0  # how long a free worker waits for a batch to fill
    max_concurrent_requests: int = 1024  # inputs in flight; beyond: 429
    max_client_batch_size: int = 256  # inputs per request; beyond: 413
    max_body_bytes: int = 4 << 20  # request body; beyond: 413
    rows_per_batch: Optional[int] = None  # rows of the longest row length per program (default: see batcher)

    def validate(self, max_seq_length: int) -> "Limits":
        for name in ("max_batch_tokens", "max_concurrent_requests", "max_client_batch_size", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"--max_wait_ms must be at least 0, got {self.max_wait_ms}")
        if self.max_batch_tokens < max_seq_length:
            raise ValueError(f"--max_batch_tokens ({self.max_batch_tokens}) must hold one input of the model's "
                             f"max_seq_length ({max_seq_length})")
        if self.max_client_batch_size > self.max_concurrent_requests:
            raise ValueError(f"--max_client_batch_size ({self.max_client_batch_size}) is above "
                             f"--max_concurrent_requests ({self.max_concurrent_requests}): such a request could "
                             "never be admitted")
        if self.rows_per_batch is not None and self.rows_per_batch < 1:
            raise ValueError(f"--rows_per_batch must be positive, got {self.rows_per_batch}")
        return self


def settle(future: asyncio.Future, job: batching.Job) -> None:
    if not future.done():
        future.set_result(job)


class EmbeddingService:
    """One model served: `warm_up()` once, then `await embed(pairs, ...)` from the event loop."""

    def __init__(self, model: Instructor, name: str, limits: Optional[Limits] = None, instructions=None,
                 default_instruction: str = "", aliases: tuple = (), encoder: Optional[BatchEncoder] = None):
        self.model = model
        self.config = model.config
        self.name = name
        self.aliases = {name, *aliases}
        self.limits = limits = (limits or Limits()).validate(model.config.max_seq_length)
        self.default_instruction = default_instruction
        self.table_name = instructions or (name if name in REFERENCE_TABLES else DEFAULT_TABLE)
        self.table = load_instructions(self.table_name)
        # The server's own programs: nothing else compiles into them, so compile counts are its own.
        self.encoder = encoder or BatchEncoder(model.config, model.params)
        devices = self.encoder.num_devices
        rows = limits.rows_per_batch or batching.default_rows_per_batch(limits.max_batch_tokens,
                                                                         model.config.max_seq_length, devices)
        self.rows_per_batch = self.encoder.round_batch_size(rows)
        self.programs = batching.Programs(self.encoder, model.buckets, self.rows_per_batch, model.config.max_seq_length)
        self.shapes = self.programs.shapes()
        self.metrics = Metrics()
        self.batcher = batching.Batcher(self.programs, limits.max_batch_tokens, limits.max_wait_ms / 1000,
                                        model.config.head.normalize, self.observe_batch)
        self.state = "loading"  # then "ready", "draining", "stopped" (or "failed")
        self.in_flight = 0  # inputs accepted and not yet answered
        self.compiles_at_ready: Optional[int] = None
        self.warm_up_seconds: Optional[float] = None
        self.rate = 0.0  # inputs per second of encode time, smoothed
        self.tokenize_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="instructor-jax-tokenize")
        self.metrics.gauge("queue_inputs", "Inputs waiting for a batch", lambda: self.batcher.queued_inputs)
        self.metrics.gauge("in_flight_inputs", "Inputs accepted and not yet answered", lambda: self.in_flight)
        self.metrics.gauge("ready", "1 once every program is compiled, 0 before and while draining",
                           lambda: float(self.state == "ready"))

    @property
    def dim(self) -> int:
        return self.config.output_dim

    # ------------------------------------------------------------------------------------ life cycle
    def warm_up(self) -> None:
        """Compiles and runs every program a batch can use, then starts the batcher: ready."""
        start = time.monotonic()
        self.programs.warm_up(self.model.tokenizer.eos_id)
        self.compiles_at_ready = self.encoder.compile_count
        self.warm_up_seconds = time.monotonic() - start
        self.batcher.start()
        if self.state == "loading":
            self.state = "ready"

    @property
    def compiles_after_warm_up(self) -> int:
        return 0 if self.compiles_at_ready is None else self.encoder.compile_count - self.compiles_at_ready

    def begin_drain(self) -> None:
        """New requests get 503 from now on; those accepted are still answered."""
        if self.state in ("loading", "ready"):
            self.state = "draining"

    async def wait_drained(self, timeout: float) -> bool:
        """Whether every accepted request was answered within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.in_flight

    def close(self) -> None:
        self.state = "stopped"
        self.batcher.stop(timeout=60)
        self.tokenize_pool.shutdown(wait=False, cancel_futures=True)

    def observe_batch(self, stats: batching.BatchStats) -> None:
        self.metrics.observe_batch(stats)
        if stats.seconds > 0:
            rate = stats.inputs / stats.seconds
            self.rate = rate if not self.rate else 0.8 * self.rate + 0.2 * rate

    # ----------------------------------------------------------------------------------- requests
    def resolve_prompt(self, prompt_name: str, prompt_type: Optional[str]) -> str:
        """The model's own named prompt, else the instruction table's entry for that task."""
        if prompt_name in self.config.prompts:
            return self.config.prompts[prompt_name]
        if prompt_name in self.table:
            return instruction_for(self.table, prompt_name, prompt_type)
        known = sorted(self.config.prompts) + sorted(self.table)
        raise ApiError(422, f"prompt_name {prompt_name!r} is neither one of the model's prompts nor a task of the "
                            f"instruction table {self.table_name} ({len(known)} names, e.g. "
                            f"{', '.join(known[:4])}); or send the instruction itself as `instruction`",
                       "prompt_name")

    def admit(self, n: int) -> None:
        if self.state != "ready":
            what = ("is still compiling its programs (GET /health says 200 once it is ready)" if self.state == "loading"
                    else "is shutting down")
            raise ApiError(503, f"the server {what}; retry, or send to another replica", code="not_ready",
                           headers={"Retry-After": "1"})
        limits = self.limits
        if n > limits.max_client_batch_size:
            raise ApiError(413, f"{n} inputs in one request; this server takes at most {limits.max_client_batch_size} "
                                "(--max_client_batch_size): split the request", "input", "too_many_inputs")
        if self.in_flight + n > limits.max_concurrent_requests:
            backlog = self.in_flight + n
            retry = min(60, max(1, math.ceil(backlog / self.rate))) if self.rate else 1
            raise ApiError(429, f"the server is at its limit of {limits.max_concurrent_requests} inputs in flight "
                                f"(--max_concurrent_requests); retry after {retry} s, or send to another replica",
                           code="overloaded", headers={"Retry-After": str(retry)})

    def tokenize(self, pairs: list, refuse_over_long: bool) -> TokenizedPairs:
        """Runs in the tokenizer thread. `refuse_over_long`: an input longer than max_seq_length is a 413."""
        tokenizer = self.model.tokenizer
        tokenized = tokenizer.tokenize(pairs, warn_truncation=False)
        if refuse_over_long and tokenized.num_truncated:
            limit = tokenizer.max_seq_length
            for index in np.flatnonzero(tokenized.lengths >= limit):
                text = join_instruction(*pairs[index])
                text = text.lower() if tokenizer.do_lower_case else text
                length = len(tokenizer.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"])
                if length > limit:
                    raise ApiError(413, f"inputs[{index}] is {length} tokens long (instruction and text together), "
                                        f"over the model's max_seq_length of {limit}; shorten it, or send "
                                        "truncate: true to embed its first tokens", "inputs", "input_too_long")
        return tokenized

    async def embed(self, pairs: list, normalize: bool = True, truncate: bool = True,
                    disconnected: Optional[Callable[[], Awaitable]] = None) -> tuple[np.ndarray, int]:
        """(embeddings [n, dim] float32, real tokens) of [instruction, text] pairs. `disconnected()` returns
        when the client goes away: its inputs are then dropped and ClientGone raised."""
        n = len(pairs)
        self.admit(n)
        self.in_flight += n
        job = None
        try:
            loop = asyncio.get_running_loop()
            tokenized = await loop.run_in_executor(self.tokenize_pool, self.tokenize, pairs, not truncate)
            future = loop.create_future()
            job = batching.Job(tokenized, normalize, lambda done: loop.call_soon_threadsafe(settle, future, done),
                               self.dim)
            self.batcher.submit(job)
            if disconnected is None:
                await future
            else:
                watcher = asyncio.ensure_future(disconnected())
                try:
                    await asyncio.wait({future, watcher}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    watcher.cancel()
                if not future.done():
                    raise ClientGone()
            if job.error is not None:
                if self.state == "stopped":
                    raise ApiError(503, "the server stopped before this request was encoded; retry", code="not_ready")
                raise ApiError(500, f"encoding failed: {type(job.error).__name__}: {job.error}")
            return job.out, job.tokens
        except (ClientGone, asyncio.CancelledError):
            if job is not None:
                self.batcher.cancel(job)
            raise
        finally:
            self.in_flight -= n

    def info(self) -> dict:
        from instructor_jax import __version__

        devices = list(self.encoder.mesh.devices.flat)
        limits = dataclasses.asdict(self.limits)
        limits["rows_per_batch"] = self.rows_per_batch
        return {"model_id": self.name, "model_type": "embedding", "model_dtype": self.config.encoder.dtype,
                "dim": self.dim, "max_input_length": self.config.max_seq_length,
                "pooling_rule": self.config.pooling_rule, "normalized": self.config.head.normalize,
                "devices": [str(d) for d in devices], "platform": devices[0].platform, "limits": limits,
                "programs": [list(s) for s in self.shapes], "instructions_table": self.table_name,
                "prompts": sorted(self.config.prompts), "default_instruction": self.default_instruction,
                "state": self.state, "compiles_after_warm_up": self.compiles_after_warm_up,
                "version": __version__}
