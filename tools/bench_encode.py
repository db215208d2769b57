"""Encoding throughput: instructor-jax against sentence-transformers (PyTorch), same model, inputs and machine.

    python tools/bench_encode.py [--size base] [--num_texts 512] [--batch_size 32] [--lengths short|mixed|long]
                                 [--dtype float32|bfloat16]
    python tools/bench_encode.py --quick      # tiny model, a few seconds (what CI runs)
    python tools/bench_encode.py --dtype bfloat16 --attention xla,cudnn,pallas_tpu,xla+fused_qkv   # side by side

Builds one random-init INSTRUCTOR-shaped model with transformers + sentence-transformers, loads the same
weights into instructor-jax, and encodes the same [instruction, text] pairs with both: sentence-transformers'
usual `encode(texts, prompt=instruction)` and `Instructor.encode`, the latter packed, unpacked, and as its
default chooses. Texts have short (5 to 40 words), mixed (10 to 200) or long (150 to 400) random lengths.
Reports sentences/s, real tokens/s, MFU (useful FLOPs, real tokens only, per second, as a fraction of the
best matmul throughput measured in this same run, JAX's or torch's) and the padded-slot ratio (token slots
computed per real token; sentence-transformers sorts by length and pads each batch to its longest).
instructor-jax's first pass compiles; its compile time is shown apart from the steady state. The timed
passes are interleaved (`--repeats`, best of each side counts), as this machine's speed drifts. On GPU,
`--dtype bfloat16` runs both in bfloat16 (T5 overflows in float16). `--attention` times several attention
implementations (and switches) side by side, packed and unpacked, each with its largest difference from xla's
embeddings on this device; one that cannot run here is reported as refused (docs/attention.md).
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES, add_attention_argument, attention_variants, is_refusal, matmul_peaks  # noqa: E402
from make_tokenizer import OBJECTS, SUBJECTS, VERBS  # noqa: E402  (the tiny tokenizer's own vocabulary)

INSTRUCTIONS = ["Represent the Wikipedia question for retrieving supporting documents: ",
                "Represent the Wikipedia document for retrieval: ",
                "Represent the news sentence for clustering: "]


LENGTHS = {"short": (5, 40), "mixed": (10, 200), "long": (150, 400)}  # words per text, inclusive


def make_inputs(n, lengths="mixed", seed=0):
    rng = np.random.default_rng(seed)
    words = " ".join(SUBJECTS + VERBS + OBJECTS).split()
    low, high = LENGTHS[lengths]
    return [[INSTRUCTIONS[i % len(INSTRUCTIONS)], " ".join(rng.choice(words, size=int(rng.integers(low, high + 1))))]
            for i in range(n)]


def sort_and_pad_slots(lengths, groups, batch_size) -> int:
    """Token slots sentence-transformers computes: per encode call, sorted by length, each batch padded
    to its longest."""
    total = 0
    for rows in groups.values():
        ordered = np.sort(lengths[rows])[::-1]
        total += sum(int(ordered[i]) * len(ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size))
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--num_texts", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_seq_length", type=int, default=512)
    parser.add_argument("--lengths", choices=sorted(LENGTHS), default="mixed", help="words per text")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--quick", action="store_true", help="tiny model, 64 texts: a smoke run for CI")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed passes of each side, interleaved; the fastest counts (this machine is noisy)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    add_attention_argument(parser)
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.num_texts, args.max_seq_length = "tiny", 64, 128

    import jax
    import torch

    from instructor_jax import Instructor
    from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.model.flops import encoder_flops
    from instructor_jax.reference import make_reference_checkpoint

    backend = jax.default_backend()
    shape = SIZES[args.size]
    config = InstructorConfig(EncoderConfig(vocab_size=32128, **shape), HeadConfig(dense_features=768),
                              max_seq_length=args.max_seq_length, pooling_rule="sentence-transformers")
    pairs = make_inputs(args.num_texts, args.lengths)
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

    tokens = int(lengths.sum())
    slots = {"sentence-transformers": sort_and_pad_slots(lengths, groups, args.batch_size)}
    sides = {"sentence-transformers": run_reference}
    models = {}
    for label, changes in attention_variants(args.attention).items():
        encoder_cfg = dataclasses.replace(ours.config.encoder, **changes)
        model = models[label] = ours if label == "xla" else Instructor(ours.config.replace(encoder=encoder_cfg),
                                                                        ours.params, ours.tokenizer.tokenizer)
        for layout, packing in (("unpacked", False), ("packed", True)):
            name = f"instructor-jax {layout}" + ("" if label == "xla" else f" [{label}]")
            sides[name] = lambda model=model, packing=packing: model.encode(
                pairs, batch_size=args.batch_size, dtype=args.dtype, packing=packing)
    cold, outputs, refused = {}, {}, {}
    with torch.inference_mode():
        for name, side in list(sides.items()):  # warm-up: compiles, first-call allocations, kernel selection
            start = time.perf_counter()
            try:
                outputs[name] = side()
            except Exception as e:  # an implementation that cannot run here says why, and the others go on
                if not is_refusal(e):
                    raise
                refused[name] = str(e)
                del sides[name]
                continue
            cold[name] = time.perf_counter() - start
            if name != "sentence-transformers":
                label = name.split("[")[-1].rstrip("]") if "[" in name else "xla"
                slots[name] = models[label].batch_encoder.last_plan["slots"]
        # Interleaved, so that a slow spell of this machine hits every side alike; each side's best pass counts.
        results = {name: float("inf") for name in sides}
        for _ in range(max(1, args.repeats)):
            for name, side in sides.items():
                start = time.perf_counter()
                side()
                results[name] = min(results[name], time.perf_counter() - start)
    # The default runs one of the two: which one, its plan says without running it again.
    ours.batch_encoder.plan(ours.tokenizer.tokenize(pairs, warn_truncation=False), args.batch_size, ours.buckets)
    chosen = "packed" if ours.batch_encoder.last_plan["packed"] else "unpacked"
    results["instructor-jax"], slots["instructor-jax"] = results[f"instructor-jax {chosen}"], slots[f"instructor-jax {chosen}"]
    cold["instructor-jax"] = cold[f"instructor-jax {chosen}"]

    print(f"\nmodel: {args.size} {shape}, {args.num_texts} {args.lengths} texts ({tokens} tokens, mean "
          f"{lengths.mean():.0f}), batch {args.batch_size}, {args.dtype}, backend {backend} "
          f"({jax.devices()[0].device_kind})")
    print(f"matmul peak measured: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch {peaks['torch'] / 1e9:.0f} GFLOP/s")
    rows = {}
    width = max(26, *(len(n) + 2 for n in [*results, *refused]))
    print(f"{'':<{width}}{'sentences/s':>12}{'tokens/s':>12}{'MFU':>8}{'slots/token':>13}{'max |diff| vs xla':>19}")
    for name, seconds in results.items():
        if name == "instructor-jax":
            continue  # the same run as the plan it chose
        xla_side = name.split(" [")[0]  # the same layout through xla
        parity = (float(np.abs(outputs[name] - outputs[xla_side]).max())
                  if name != xla_side and name in outputs and xla_side in outputs else None)
        rows[name] = {"seconds": seconds, "sentences_per_s": args.num_texts / seconds, "tokens_per_s": tokens / seconds,
                      "mfu": flops / seconds / peak, "padded_slot_ratio": slots[name] / tokens,
                      "max_diff_vs_xla": parity}
        print(f"{name:<{width}}{rows[name]['sentences_per_s']:>12.1f}{rows[name]['tokens_per_s']:>12.0f}"
              f"{rows[name]['mfu']:>8.1%}{rows[name]['padded_slot_ratio']:>13.2f}"
              + (f"{parity:>19.2e}" if parity is not None else ""))
    for name, reason in refused.items():
        print(f"{name:<{width}}refused: {reason}")
    for name in ("instructor-jax unpacked", "instructor-jax packed"):
        print(f"{name} / sentence-transformers: {results['sentence-transformers'] / results[name]:.2f}x sentences/s")
    ratio = results["sentence-transformers"] / results["instructor-jax"]
    print(f"instructor-jax / sentence-transformers: {ratio:.2f}x sentences/s (default: {chosen})")
    print(f"instructor-jax compiled {ours.compile_count} programs in all ({len(ours.buckets)} buckets); first "
          f"default pass {cold['instructor-jax']:.1f}s")
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({
            "size": args.size, "dtype": args.dtype, "backend": backend, "device": jax.devices()[0].device_kind,
            "lengths": args.lengths, "peaks": peaks, "results": rows, "ratio": ratio, "default": chosen,
            "compile_count": ours.compile_count, "first_pass_s": cold, "refused": refused}, indent=2))
    return ratio


if __name__ == "__main__":
    main()
