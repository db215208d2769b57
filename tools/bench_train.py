"""Train-step throughput: instructor-jax against the same model, batch and loss in PyTorch, in one run.

    python tools/bench_train.py [--size base] [--batch_size 8] [--seq_len 64] [--steps 3] [--dtype float32|bfloat16]
    python tools/bench_train.py --quick      # tiny model, a few seconds (what CI runs)

One random-init INSTRUCTOR-shaped checkpoint, made with transformers + sentence-transformers, feeds both
sides the same weights. The PyTorch side is transformers' T5EncoderModel with the INSTRUCTOR head (mean
pooling over text tokens, Dense, L2 norm), the reference's contrastive loss written in torch, AdamW and
gradient clipping; the JAX side is the trainer's own jitted step (`instructor_jax.train.make_train_step`).
Both see identical batches of (query, positive, hard negative) token ids. Reports examples/s, tokens/s and
MFU (3 x forward FLOPs of the real tokens per second, over the best matmul rate measured in this run).
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES, add_training_layout_arguments, matmul_peaks  # noqa: E402


def make_batch(batch_size, seq_len, vocab, seed=0):
    """Random ids (no padding) and instruction lengths for query, pos and one negative per example."""
    rng = np.random.default_rng(seed)
    batch = {}
    for name, shape in (("query", (batch_size,)), ("pos", (batch_size,)), ("neg", (batch_size, 1))):
        ids = rng.integers(3, vocab, size=(*shape, seq_len)).astype(np.int32)
        ids[..., -1] = 1  # </s>
        batch[f"{name}_ids"] = ids
        batch[f"{name}_mask"] = np.ones_like(ids)
        batch[f"{name}_instruction_lengths"] = rng.integers(0, seq_len // 4, size=shape).astype(np.int32)
    return batch


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_training_layout_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.seq_len, args.steps = "tiny", 8, 32, 3

    import jax
    import jax.numpy as jnp

    from instructor_jax import convert
    from instructor_jax.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.metrics import encoder_flops
    from instructor_jax.model import InstructorModel, init_params, stack_layers
    from instructor_jax.reference import make_reference_checkpoint, torch_train_step
    from instructor_jax.train import TrainConfig, make_optimizer, make_train_step

    backend = jax.default_backend()
    device = "cuda" if backend == "gpu" else "cpu"
    config = InstructorConfig(EncoderConfig(vocab_size=32128, dtype=args.dtype, **SIZES[args.size]),
                              HeadConfig(dense_features=768), max_seq_length=args.seq_len)
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=2e-5, warmup_steps=0, total_steps=1000,
                      temperature=0.05, dtype=args.dtype, prng_impl=args.prng_impl)
    batch = make_batch(args.batch_size, args.seq_len, config.encoder.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        make_reference_checkpoint(pathlib.Path(tmp, "model"), dataclasses.replace(
            config, encoder=dataclasses.replace(config.encoder, dtype="float32")))
        torch_step = torch_train_step(pathlib.Path(tmp, "model"), config, cfg, device, args.dtype)
        _, flat = convert.read_sentence_transformers(pathlib.Path(tmp, "model"))
    if not args.unrolled:
        config = config.replace(encoder=dataclasses.replace(config.encoder, scan_layers=True))
        flat = stack_layers(flat, config.encoder.num_layers)
    model = InstructorModel(config.encoder, config.head)
    tx, schedule = make_optimizer(cfg)
    params = convert.unflatten_params({k: jnp.asarray(v) for k, v in flat.items()})
    expected = jax.eval_shape(lambda: init_params(config.encoder, config.head))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    jax_step = jax.jit(make_train_step(model, tx, schedule, cfg), donate_argnums=(0,))
    device_batch = jax.device_put(batch)

    lengths = np.full(3 * args.batch_size, args.seq_len)
    flops = 3 * encoder_flops(lengths, config.encoder, 768)
    peaks = matmul_peaks(args.dtype)
    peak = max(peaks.values())

    start = time.perf_counter()
    state, metrics = jax_step(state, device_batch)
    jax.block_until_ready(metrics)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = jax_step(state, device_batch)
    jax.block_until_ready(metrics)
    jax_seconds = (time.perf_counter() - start) / args.steps

    torch_step(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        torch_step(batch)
    torch_seconds = (time.perf_counter() - start) / args.steps

    tokens = 3 * args.batch_size * args.seq_len
    print(f"\nmodel: {args.size} {SIZES[args.size]}, batch {args.batch_size} x (query, pos, 1 neg) x {args.seq_len} "
          f"tokens, {args.dtype}, {'unrolled' if args.unrolled else 'scanned'} layers, dropout bits "
          f"{args.prng_impl}, backend {backend} ({jax.devices()[0].device_kind})")
    print(f"matmul peak measured: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch {peaks['torch'] / 1e9:.0f} GFLOP/s")
    print(f"{'':<24}{'step s':>9}{'examples/s':>12}{'tokens/s':>11}{'MFU':>8}")
    for name, seconds in (("pytorch (transformers)", torch_seconds), ("instructor-jax", jax_seconds)):
        print(f"{name:<24}{seconds:>9.3f}{args.batch_size / seconds:>12.2f}{tokens / seconds:>11.0f}"
              f"{flops / seconds / peak:>8.1%}")
    ratio = torch_seconds / jax_seconds
    print(f"instructor-jax / pytorch: {ratio:.2f}x examples/s (first JAX step incl. compile: {compile_seconds:.1f}s)")
    return ratio


if __name__ == "__main__":
    main()
