"""Load test of `instructor-jax serve`: asyncio clients against a server on localhost, and, in the same run,
offline `Instructor.encode` of the same inputs.

    python tools/load_test.py --size small --concurrency 64 --requests 512          # closed loop, 64 clients
    python tools/load_test.py --size small --concurrency 1 --requests 40            # latency of one client
    python tools/load_test.py --size tiny --rate 3000 --requests 10000 --max_concurrent_requests 16   # overload
    python tools/load_test.py --url http://127.0.0.1:8080 --model_dir DIR ...      # a server already running

Without --url it builds a random-init model of the `bench_encode` shapes (`--size`, t5-small is "small") with
`make_reference_checkpoint`, starts `python -m instructor_jax.serve.command` on 127.0.0.1 (a free port) and
stops it with SIGTERM at the end. Clients send one [instruction, text] input per request (the texts of
bench_encode's short / mixed / long distributions) to /v1/embeddings as the OpenAI client does (base64), either
closed-loop (`--concurrency` clients, each sending its next request when the last is answered) or open-loop
(`--rate` requests per second whatever the answers), bounded by `--requests` and `--max_seconds`.

Reports inputs/s, tokens/s, p50/p90/p99 latency, answers by status, answers that differ from offline
`encode` (> 1e-5), compiles after warm-up, the server's memory (RSS) after warm-up and at its highest, and
offline encode throughput on the same inputs (best of a pass before and one after the load) with the ratio.
"""

import argparse
import asyncio
import base64
import collections
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_encode import LENGTHS, make_inputs  # noqa: E402
from benchlib import SIZES  # noqa: E402


def build_model(directory: pathlib.Path, size: str, max_seq_length: int) -> None:
    from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.reference import make_reference_checkpoint

    config = InstructorConfig(EncoderConfig(vocab_size=32128, **SIZES[size]), HeadConfig(dense_features=768),
                              max_seq_length=max_seq_length, pooling_rule="sentence-transformers")
    make_reference_checkpoint(directory, config)


def start_server(model_dir, flags) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "instructor_jax.serve.command", "--model", str(model_dir), "--port", "0", *flags]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    ready = threading.Event()
    found = {}

    def read():
        for line in process.stderr:
            sys.stderr.write(f"[server] {line}")
            match = re.search(r"ready at (http://\S+):", line)
            if match:
                found["url"] = match.group(1)
                ready.set()
    threading.Thread(target=read, daemon=True).start()
    while not ready.wait(1):
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode} before it was ready")
    return process, found["url"]


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Results:
    def __init__(self):
        self.latencies, self.statuses, self.wrong, self.tokens = [], collections.Counter(), 0, 0


async def send(client, pair, expected, results: Results, api_key, slots=None):
    """One request; its latency counts from now (open loop: from when it was due, waiting for a connection
    included)."""
    start = time.perf_counter()
    if slots is None:
        return await _post(client, pair, expected, results, api_key, start)
    async with slots:  # at most max_connections requests open: httpx's pool is slow with many waiting
        return await _post(client, pair, expected, results, api_key, start)


async def _post(client, pair, expected, results: Results, api_key, start):
    import httpx

    try:
        response = await client.post("/v1/embeddings", json={"input": pair[1], "instruction": pair[0],
                                                              "encoding_format": "base64"},
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
    except httpx.HTTPError as e:
        results.statuses[type(e).__name__] += 1
        return
    results.statuses[response.status_code] += 1
    if response.status_code == 200:
        results.latencies.append(time.perf_counter() - start)
        body = response.json()
        results.tokens += body["usage"]["prompt_tokens"]
        got = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4")
        if expected is not None and np.abs(got - expected).max() > 1e-5:
            results.wrong += 1


async def load(url, pairs, expected, args) -> tuple[Results, float]:
    import httpx

    results = Results()
    limits = httpx.Limits(max_connections=max(args.concurrency, args.max_connections), max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout_s, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + args.max_seconds
        if args.rate:  # open loop: request i is due at start + i / rate, answered or not
            tasks, slots = [], asyncio.Semaphore(args.max_connections)
            for i in range(args.requests):
                delay = start + i / args.rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if time.perf_counter() > stop_at:
                    break
                k = i % len(pairs)
                tasks.append(asyncio.create_task(send(client, pairs[k], expected[k], results, args.api_key, slots)))
            await asyncio.gather(*tasks)
        else:  # closed loop: each client sends its next request once the last is answered
            counter = iter(range(args.requests))

            async def client_loop():
                for i in counter:
                    if time.perf_counter() > stop_at:
                        return
                    k = i % len(pairs)
                    await send(client, pairs[k], expected[k], results, args.api_key)
            await asyncio.gather(*(client_loop() for _ in range(args.concurrency)))
        return results, time.perf_counter() - start


def offline(model, pairs, batch_size, singles: int) -> tuple[float, float]:
    """(inputs/s of one encode call over all the pairs, median seconds of a one-input encode of each of the
    first `singles` pairs: those a run of fewer requests sends)."""
    model.encode(pairs, batch_size=batch_size)  # compiles
    start = time.perf_counter()
    model.encode(pairs, batch_size=batch_size)
    throughput = len(pairs) / (time.perf_counter() - start)
    seconds = []
    for pair in pairs[:singles]:
        model.encode([pair])
    for pair in pairs[:singles]:
        t = time.perf_counter()
        model.encode([pair])
        seconds.append(time.perf_counter() - t)
    return throughput, float(np.median(seconds))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one on 127.0.0.1)")
    parser.add_argument("--model_dir", help="the model the server serves (default: build one of --size)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="mixed")
    parser.add_argument("--distinct", type=int, default=256, help="distinct inputs, sent round-robin")
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    parser.add_argument("--rate", type=float, help="open loop: requests per second")
    parser.add_argument("--max_connections", type=int, default=64, help="open loop: the client's connections")
    parser.add_argument("--max_seconds", type=float, default=600, help="stop sending after this long")
    parser.add_argument("--timeout_s", type=float, default=300)
    parser.add_argument("--api_key")
    parser.add_argument("--no_offline", action="store_true", help="skip offline encode (and the answers' check)")
    parser.add_argument("--offline_batch_size", type=int, default=32)
    parser.add_argument("--json", help="also write the results here")
    args, server_flags = parser.parse_known_args(argv)  # the rest goes to the server (--max_wait_ms, ...)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir
        if model_dir is None:
            model_dir = pathlib.Path(tmp, "model")
            build_model(model_dir, args.size, args.max_seq_length)
        pairs = make_inputs(args.distinct, args.lengths)
        model, expected, rates = None, [None] * len(pairs), []
        if not args.no_offline:
            from instructor_jax import Instructor

            model = Instructor.from_pretrained(model_dir)
            expected = model.encode(pairs)
            rates.append(offline(model, pairs, args.offline_batch_size, min(len(pairs), args.requests, 40)))
        process, url = None, args.url
        try:
            if url is None:
                flags = server_flags + (["--api_key", args.api_key] if args.api_key else [])
                process, url = start_server(model_dir, flags)
            report = run_load(url, process, pairs, expected, args, model, rates)
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                code = process.wait(timeout=120)
        if process is not None:
            report["server_exit_code"] = code
    print(json.dumps(report, indent=2))
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
    return report


def run_load(url, process, pairs, expected, args, model, rates) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    info = httpx.get(f"{url}/info", headers=headers).json()
    rss = {"after_warm_up": rss_bytes(process.pid) if process else 0, "highest": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.25):
            rss["highest"] = max(rss["highest"], rss_bytes(process.pid))
    if process is not None:
        threading.Thread(target=sample, daemon=True).start()
    results, seconds = asyncio.run(load(url, pairs, expected, args))
    done.set()
    if process is not None:
        rss["highest"] = max(rss["highest"], rss_bytes(process.pid))
        rss["after_load"] = rss_bytes(process.pid)
    after = httpx.get(f"{url}/info", headers=headers).json()
    if model is not None:
        rates.append(offline(model, pairs, args.offline_batch_size, min(len(pairs), args.requests, 40)))
    answered = len(results.latencies)
    lat = np.array(results.latencies or [np.nan]) * 1000
    report = {
        "model": info["model_id"], "devices": len(info["devices"]), "platform": info["platform"],
        "dtype": info["model_dtype"], "limits": info["limits"], "lengths": args.lengths,
        "mode": f"open loop {args.rate:g}/s" if args.rate else f"closed loop, {args.concurrency} clients",
        "requests_sent": sum(results.statuses.values()), "seconds": seconds,
        "statuses": {str(k): v for k, v in sorted(results.statuses.items(), key=str)},
        "inputs_per_s": answered / seconds, "tokens_per_s": results.tokens / seconds,
        "latency_ms": {"p50": float(np.percentile(lat, 50)), "p90": float(np.percentile(lat, 90)),
                       "p99": float(np.percentile(lat, 99)), "max": float(lat.max())},
        "wrong_answers": results.wrong, "compiles_after_warm_up": after["compiles_after_warm_up"],
        "server_rss_mb": {k: v / 2**20 for k, v in rss.items()},
    }
    if rates:
        best = max(r[0] for r in rates)
        report["offline"] = {"inputs_per_s": [r[0] for r in rates], "single_input_ms": min(r[1] for r in rates) * 1000,
                             "ratio_served_to_offline": report["inputs_per_s"] / best}
    if rss["after_warm_up"]:
        report["server_rss_growth"] = rss["highest"] / rss["after_warm_up"] - 1
    return report


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
