"""Encoding throughput: instructor-jax against sentence-transformers (PyTorch), same model, inputs and machine.

    python tools/bench_encode.py [--size base] [--num_texts 512] [--batch_size 32] [--dtype float32|bfloat16]
    python tools/bench_encode.py --quick      # tiny model, a few seconds (what CI runs)

Builds one random-init INSTRUCTOR-shaped model with transformers + sentence-transformers, loads the same
weights into instructor-jax, and encodes the same [instruction, text] pairs (10 to 200 random words) with
both: sentence-transformers' usual `encode(texts, prompt=instruction)` and `Instructor.encode`. Reports
sentences/s, real tokens/s, and MFU: useful FLOPs (real tokens only, padding excluded) per second as a
fraction of the best matmul throughput measured in this same run (JAX's and torch's, the higher of the two).
instructor-jax's first pass compiles (at most one program per bucket); its compile time is shown apart
from the steady state. On GPU, `--dtype bfloat16` runs both in bfloat16 (T5 overflows in float16).
"""

import argparse
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES, matmul_peaks  # noqa: E402
from make_tokenizer import OBJECTS, SUBJECTS, VERBS  # noqa: E402  (the tiny tokenizer's own vocabulary)

INSTRUCTIONS = ["Represent the Wikipedia question for retrieving supporting documents: ",
                "Represent the Wikipedia document for retrieval: ",
                "Represent the news sentence for clustering: "]


def make_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    words = " ".join(SUBJECTS + VERBS + OBJECTS).split()
    return [[INSTRUCTIONS[i % len(INSTRUCTIONS)], " ".join(rng.choice(words, size=int(rng.integers(10, 201))))]
            for i in range(n)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--num_texts", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64 texts: a smoke run for CI")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.num_texts, args.max_seq_length = "tiny", 64, 128

    import jax
    import torch

    from instructor_jax import Instructor
    from instructor_jax.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.metrics import encoder_flops
    from instructor_jax.reference import make_reference_checkpoint

    backend = jax.default_backend()
    shape = SIZES[args.size]
    config = InstructorConfig(EncoderConfig(vocab_size=32128, **shape), HeadConfig(dense_features=768),
                              max_seq_length=args.max_seq_length, pooling_rule="sentence-transformers")
    pairs = make_inputs(args.num_texts)
    with tempfile.TemporaryDirectory() as tmp:
        reference = make_reference_checkpoint(pathlib.Path(tmp, "model"), config)
        ours = Instructor.from_pretrained(pathlib.Path(tmp, "model"))
    device = "cuda" if backend == "gpu" else "cpu"
    reference = reference.to(device)
    if args.dtype == "bfloat16":
        reference = reference.to(torch.bfloat16)
    lengths = ours.tokenizer.tokenize(pairs, warn_truncation=False).lengths
    flops = encoder_flops(lengths, config.encoder, 768)
    peaks = matmul_peaks(args.dtype)
    peak = max(peaks.values())

    groups = {}
    for k, (instruction, text) in enumerate(pairs):
        groups.setdefault(instruction, []).append(k)

    def run_reference():
        for instruction, rows in groups.items():
            reference.encode([pairs[k][1] for k in rows], prompt=instruction, batch_size=args.batch_size,
                             convert_to_numpy=True, show_progress_bar=False)

    def run_ours():
        ours.encode(pairs, batch_size=args.batch_size, dtype=args.dtype)

    results = {}
    with torch.inference_mode():
        run_reference()  # warm-up: first-call allocations and kernel selection
        start = time.perf_counter()
        run_reference()
        results["sentence-transformers"] = time.perf_counter() - start
    start = time.perf_counter()
    run_ours()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    run_ours()
    results["instructor-jax"] = time.perf_counter() - start

    tokens = int(lengths.sum())
    print(f"\nmodel: {args.size} {shape}, {args.num_texts} texts ({tokens} tokens, mean {lengths.mean():.0f}), "
          f"batch {args.batch_size}, {args.dtype}, backend {backend} ({jax.devices()[0].device_kind})")
    print(f"matmul peak measured: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch {peaks['torch'] / 1e9:.0f} GFLOP/s")
    print(f"{'':<24}{'sentences/s':>12}{'tokens/s':>12}{'MFU':>8}")
    rows = {}
    for name, seconds in results.items():
        rows[name] = {"seconds": seconds, "sentences_per_s": args.num_texts / seconds, "tokens_per_s": tokens / seconds,
                      "mfu": flops / seconds / peak}
        print(f"{name:<24}{rows[name]['sentences_per_s']:>12.1f}{rows[name]['tokens_per_s']:>12.0f}"
              f"{rows[name]['mfu']:>8.1%}")
    ratio = results["sentence-transformers"] / results["instructor-jax"]
    print(f"instructor-jax / sentence-transformers: {ratio:.2f}x sentences/s")
    print(f"instructor-jax compiled {ours.compile_count} programs ({len(ours.buckets)} buckets); first pass "
          f"{cold:.1f}s, of which compilation ~{max(cold - results['instructor-jax'], 0):.1f}s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "size": args.size, "dtype": args.dtype, "backend": backend, "device": jax.devices()[0].device_kind,
            "peaks": peaks, "results": rows, "ratio": ratio, "compile_count": ours.compile_count,
            "first_pass_s": cold}, indent=2))
    return ratio


if __name__ == "__main__":
    main()
