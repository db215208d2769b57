"""Exact top-k search throughput on CPU: instructor_jax.search against FAISS IndexFlatIP and torch.topk.

    .venv/bin/python tools/bench_search.py                     # 100k x 768 corpus, 1024 queries, k=10
    .venv/bin/python tools/bench_search.py --rows 20000 --queries 256

All three search the same unit-norm float32 corpus for the same queries in the same run; each is timed after
a warm-up (JAX: compiled; FAISS: index built), the sides interleaved, best of --repeats. The results are checked against each other
(ids equal where the scores are not within float rounding of a tie). Prints queries/s and the ratios.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256, help="our query batch (default 256)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import faiss
    import torch

    from instructor_jax.search.topk import ShardedCorpus, search
    import jax

    rng = np.random.default_rng(0)
    corpus = rng.normal(size=(args.rows, args.dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)

    placed = ShardedCorpus(corpus)
    ours = lambda: search(placed, queries, args.k, batch_size=args.batch_size)  # noqa: E731
    result = ours()  # compiles

    index = faiss.IndexFlatIP(args.dim)
    index.add(corpus)
    flat = lambda: index.search(queries, args.k)  # noqa: E731
    faiss_scores, faiss_ids = flat()

    corpus_t, queries_t = torch.from_numpy(corpus), torch.from_numpy(queries)
    topk = lambda: torch.topk(queries_t @ corpus_t.T, args.k, dim=1)  # noqa: E731
    topk()

    agree = float(np.mean(result.indices == faiss_ids))
    sides = (("instructor_jax", ours), ("faiss IndexFlatIP", flat), ("torch topk", topk))
    times = {name: [] for name, _ in sides}
    for _ in range(args.repeats):  # interleaved: the machine's speed drifts
        for name, function in sides:
            times[name].append(best_time(function, 1))
    figures = {name: args.queries / min(seconds) for name, seconds in times.items()}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.device_count()} {jax.devices()[0].platform} devices), faiss {faiss.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"corpus {args.rows} x {args.dim} float32, {args.queries} queries, k={args.k}, our batch {args.batch_size}")
    for name, rate in figures.items():
        print(f"  {name:<18} {rate:10.1f} queries/s")
    print(f"  ratio: {figures['instructor_jax'] / figures['faiss IndexFlatIP']:.2f}x faiss flat, "
          f"{figures['instructor_jax'] / figures['torch topk']:.2f}x torch topk; ids equal to faiss's: {agree:.4f}; "
          f"max score difference {np.abs(result.scores - faiss_scores).max():.1e}")


if __name__ == "__main__":
    main()
