"""Train-step throughput: instructor-jax against the same model, batch and loss in PyTorch, in one run.

    python tools/bench_train.py [--size base] [--batch_size 8] [--seq_len 64] [--steps 3] [--dtype float32|bfloat16]
    python tools/bench_train.py --quick      # tiny model, a few seconds (what CI runs)
    python tools/bench_train.py --lengths medi --size small   # varied lengths: packed vs unpacked, side by side
    python tools/bench_train.py --size large --dtype bfloat16 --attention xla,cudnn   # attention side by side

One random-init INSTRUCTOR-shaped checkpoint, made with transformers + sentence-transformers, feeds both
sides the same weights. The PyTorch side is transformers' T5EncoderModel with the INSTRUCTOR head (mean
pooling over text tokens, Dense, L2 norm), the reference's contrastive loss written in torch, AdamW and
gradient clipping; the JAX side is the trainer's own jitted step (`instructor_jax.train.step.make_train_step`).
Both see identical batches of (query, positive, hard negative) token ids. Reports examples/s, tokens/s and
MFU (3 x forward FLOPs of the real tokens per second, over the best matmul rate measured in this run).

`--lengths medi` draws variable lengths instead (see `make_medi_batch`), pads them as the trainer's
BatchTokenizer does, and times the trainer's step on that batch both unpacked and packed
(`data.pack_batch`), next to PyTorch on the unpacked batch: real (non-padding) tokens/s, padding fraction,
the packed / unpacked ratio, and the first step's losses of all three (dropout off, so they must agree).

`--attention` times several attention implementations (and switches, docs/attention.md) side by side, each
with its first step's loss next to xla's; one that cannot run here is reported as refused. Where the list
names a fused kernel (no dropout on the attention weights), every variant trains with
attention_dropout_rate 0, so that all compute the same function.
"""

import argparse
import dataclasses
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import (SIZES, add_attention_argument, add_training_layout_arguments, attention_variants,  # noqa: E402
                      is_refusal, matmul_peaks)


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


def make_medi_batch(batch_size, seq_len, vocab, seed=0):
    """Variable-length ids for query, pos and one negative per example, padded as BatchTokenizer pads them:
    each of query, pos and neg to the smallest default bucket holding its longest sequence.

    Lengths, instruction included, MEDI-like: queries uniform over 8-40 tokens (an instruction of ~10-15
    tokens plus a question or sentence); positives and negatives log-uniform over 30-300 tokens (MEDI mixes
    sentence-pair tasks, short on both sides, with retrieval tasks whose passages are paragraphs: log-uniform
    gives each octave the same weight, so both kinds and the long tail appear in every batch), cut at
    seq_len as the tokenizer cuts them. Instructions (not pooled) take 4-12 of the leading tokens.
    """
    from instructor_jax.model.tokenization import assign_buckets, default_buckets, pad_batch

    rng = np.random.default_rng(seed)
    buckets = default_buckets(seq_len)
    batch = {}
    for name, shape, (low, high), log in (("query", (batch_size,), (8, 40), False),
                                          ("pos", (batch_size,), (30, 300), True),
                                          ("neg", (batch_size, 1), (30, 300), True)):
        count = int(np.prod(shape))
        drawn = np.exp(rng.uniform(np.log(low), np.log(high), count)) if log else rng.uniform(low, high + 1, count)
        lengths = np.minimum(drawn.astype(int), seq_len)
        sequences = [np.append(rng.integers(3, vocab, n - 1), 1).astype(np.int32) for n in lengths]  # </s> last
        bucket = buckets[int(assign_buckets(np.array([lengths.max()]), buckets)[0])]
        ids, mask = pad_batch(sequences, bucket)
        batch[f"{name}_ids"], batch[f"{name}_mask"] = ids.reshape(*shape, bucket), mask.reshape(*shape, bucket)
        batch[f"{name}_instruction_lengths"] = np.minimum(rng.integers(4, 13, count), lengths - 1).reshape(shape)
    return batch


def time_steps(step, state, batch, steps):
    """(first step's metrics, seconds per step after it, seconds of the first step including compile)."""
    import jax

    start = time.perf_counter()
    state, first = step(state, batch)
    first = jax.device_get(first)
    compile_seconds = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    return first, (time.perf_counter() - start) / steps, compile_seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=None, help="default 64; 512 with --lengths medi")
    parser.add_argument("--lengths", choices=("fixed", "medi"), default="fixed",
                        help="fixed: every sequence seq_len tokens; medi: MEDI-like variable lengths, packed vs "
                             "unpacked")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    add_training_layout_arguments(parser)
    add_attention_argument(parser)
    parser.add_argument("--quick", action="store_true", help="tiny model: a smoke run for CI")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch_size, args.steps = "tiny", 8, 3
        args.seq_len = args.seq_len or (128 if args.lengths == "medi" else 32)
    args.seq_len = args.seq_len or (512 if args.lengths == "medi" else 64)

    import jax
    import jax.numpy as jnp

    from instructor_jax.checkpoints import convert, tensor_table
    from instructor_jax.runtime import host_devices, sharding
    from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.model.flops import encoder_flops
    from instructor_jax.model import encoder
    from instructor_jax.model.encoder import InstructorModel, init_params, stack_layers
    from instructor_jax.reference import make_reference_checkpoint, torch_train_step
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.step import make_optimizer, make_train_step

    backend = jax.default_backend()
    device = "cuda" if backend == "gpu" else "cpu"
    # Dropout off for the variable-length comparison, so that the three first-step losses must agree.
    dropout = {"dropout_rate": 0.0} if args.lengths == "medi" else {}
    config = InstructorConfig(EncoderConfig(vocab_size=32128, dtype=args.dtype, **SIZES[args.size], **dropout),
                              HeadConfig(dense_features=768), max_seq_length=args.seq_len)
    cfg = TrainConfig(batch_size=args.batch_size, learning_rate=2e-5, warmup_steps=0, total_steps=1000,
                      temperature=0.05, dtype=args.dtype, prng_impl=args.prng_impl)
    if args.lengths == "medi":
        batch = make_medi_batch(args.batch_size, args.seq_len, config.encoder.vocab_size)
    else:
        batch = make_batch(args.batch_size, args.seq_len, config.encoder.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        make_reference_checkpoint(pathlib.Path(tmp, "model"), dataclasses.replace(
            config, encoder=dataclasses.replace(config.encoder, dtype="float32")))
        torch_step = torch_train_step(pathlib.Path(tmp, "model"), config, cfg, device, args.dtype)
        _, flat = convert.read_sentence_transformers(pathlib.Path(tmp, "model"))
    if not args.unrolled:
        config = config.replace(encoder=dataclasses.replace(config.encoder, scan_layers=True))
        flat = stack_layers(flat, config.encoder.num_layers)
    tx, schedule = make_optimizer(cfg)
    params = tensor_table.unflatten_params({k: jnp.asarray(v) for k, v in flat.items()})
    expected = jax.eval_shape(lambda: init_params(config.encoder, config.head))
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    # The trainer's default mesh: every device on the data axis (on a CPU, one device unless XLA_FLAGS or
    # INSTRUCTOR_JAX_CPU_DEVICES ask for more: instructor_jax.runtime.host_devices), parameters laid out by the rules.
    mesh = sharding.make_mesh((-1, 1, 1), host_devices.training_devices() or jax.local_devices())
    if args.batch_size % mesh.size:
        raise SystemExit(f"--batch_size {args.batch_size} does not split over the {mesh.size} devices")
    params = jax.device_put(params, encoder.param_shardings(InstructorModel(config.encoder, config.head), mesh))
    variants = attention_variants(args.attention)
    fused = any(v["attention"] != "xla" for v in variants.values())  # auto may stand for a fused kernel

    def make_step(changes):
        """The jitted train step of one variant (state donated), under the mesh."""
        encoder_cfg = dataclasses.replace(config.encoder, **changes, **({"attention_dropout_rate": 0.0} if fused else {}))
        train_step = jax.jit(make_train_step(InstructorModel(encoder_cfg, config.head), tx, schedule, cfg),
                             donate_argnums=(0,))

        def jax_step(state, batch):
            with sharding.activate(mesh):
                return train_step(state, batch)
        return jax_step

    steps = {label: make_step(changes) for label, changes in variants.items()}

    def place(batch):
        return {k: jax.device_put(v, sharding.batch_sharding(mesh, np.ndim(v))) for k, v in batch.items()}
    peaks = matmul_peaks(args.dtype)
    peak = max(peaks.values())
    header = (f"\nmodel: {args.size} {SIZES[args.size]}, batch {args.batch_size} x (query, pos, 1 neg), "
              f"{args.dtype}, {'unrolled' if args.unrolled else 'scanned'} layers, dropout bits {args.prng_impl}, "
              f"backend {backend} ({mesh.size} x {jax.devices()[0].device_kind})"
              + (", attention-weight dropout off (fused kernels have none)" if fused else ""))
    if args.lengths == "medi":
        return compare_packing(args, batch, params, steps, place, mesh.size, tx, torch_step, config, peaks, peak,
                               header)

    lengths = np.full(3 * args.batch_size, args.seq_len)
    flops = 3 * encoder_flops(lengths, config.encoder, 768)
    timed, refused = {}, {}
    for label, jax_step in steps.items():
        result = time_variant(jax_step, params, tx, place(batch), args.steps, refused, label)
        if result is not None:
            first, seconds, compile_seconds = result
            timed[label] = (seconds, float(first["loss"]), compile_seconds)

    torch_step(batch)  # warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        torch_step(batch)
    torch_seconds = (time.perf_counter() - start) / args.steps

    tokens = 3 * args.batch_size * args.seq_len
    print(header.replace("1 neg)", f"1 neg) x {args.seq_len} tokens"))
    print(f"matmul peak measured: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch {peaks['torch'] / 1e9:.0f} GFLOP/s")
    print(f"{'':<40}{'step s':>9}{'examples/s':>12}{'tokens/s':>11}{'MFU':>8}{'first loss - xla':>18}")
    rows = [("pytorch (transformers)", torch_seconds, None)]
    rows += [("instructor-jax" + ("" if label == "xla" else f" [{label}]"), seconds,
              None if label == "xla" else loss - timed["xla"][1]) for label, (seconds, loss, _) in timed.items()]
    for name, seconds, parity in rows:
        print(f"{name:<40}{seconds:>9.3f}{args.batch_size / seconds:>12.2f}{tokens / seconds:>11.0f}"
              f"{flops / seconds / peak:>8.1%}" + (f"{parity:>18.2e}" if parity is not None else ""))
    for label, reason in refused.items():
        print(f"{'instructor-jax [' + label + ']':<40}refused: {reason}")
    jax_seconds, _, compile_seconds = timed["xla"]
    ratio = torch_seconds / jax_seconds
    print(f"instructor-jax / pytorch: {ratio:.2f}x examples/s (first JAX step incl. compile: {compile_seconds:.1f}s)")
    return ratio


def time_variant(jax_step, params, tx, batch, steps: int, refused: dict, name: str):
    """(first step's metrics, seconds per step, compile seconds) of one variant, from a fresh copy of the
    state (the step donates it); None where the variant refuses to run here, its reason kept in `refused`
    so that the others go on."""
    import jax
    import jax.numpy as jnp

    fresh = jax.tree.map(jnp.copy, params)
    state = {"step": jnp.zeros((), jnp.int32), "params": fresh, "opt_state": tx.init(fresh)}
    try:
        return time_steps(jax_step, state, batch, steps)
    except Exception as e:  # noqa: BLE001 - a refusal is reported, anything else re-raised
        if not is_refusal(e):
            raise
        refused[name] = str(e)
        return None


def compare_packing(args, batch, params, steps, place, num_devices, tx, torch_step, config, peaks, peak, header):
    """The trainer's step on the variable-length batch unpacked and packed for every attention variant, and
    PyTorch unpacked: real tokens/s side by side, and xla's packed / unpacked ratio (returned)."""
    from instructor_jax.train import data
    from instructor_jax.model.flops import encoder_flops
    from instructor_jax.train.step import computed_lengths, real_lengths

    packed = data.pack_batch(batch, args.seq_len, row_unit=num_devices)  # rows split evenly over the devices
    real = int(real_lengths(batch).sum())
    flops = 3 * encoder_flops(real_lengths(batch), config.encoder, config.head.dense_features)
    rows, refused = {}, {}
    for label, jax_step in steps.items():
        for layout_name, layout in (("unpacked", batch), ("packed", packed)):
            name = f"instructor-jax {layout_name}" + ("" if label == "xla" else f" [{label}]")
            result = time_variant(jax_step, params, tx, place(layout), args.steps, refused, name)
            if result is None:
                continue
            first, seconds, compile_seconds = result
            rows[name] = {"seconds": seconds, "loss": float(first["loss"]), "compile": compile_seconds,
                          "slots": int(computed_lengths(layout).sum())}
    torch_loss = torch_step(batch)  # the first step, also the warm-up
    start = time.perf_counter()
    for _ in range(args.steps):
        torch_step(batch)
    rows = {"pytorch (transformers)": {"seconds": (time.perf_counter() - start) / args.steps, "loss": torch_loss,
                                       "slots": int(computed_lengths(batch).sum())}, **rows}

    shapes = ", ".join(f"{p} {'x'.join(map(str, batch[f'{p}_ids'].shape))}" for p in data.PARTS)
    print(header)
    print(f"MEDI-like lengths (queries 8-40, passages log-uniform 30-300, cut at {args.seq_len}): {real} real tokens; "
          f"unpacked {shapes}; packed {'x'.join(map(str, packed['rows_ids'].shape))} rows")
    print(f"matmul peak measured: jax {peaks['jax'] / 1e9:.0f} GFLOP/s, torch {peaks['torch'] / 1e9:.0f} GFLOP/s")
    width = max(26, *(len(n) + 2 for n in [*rows, *refused]))
    print(f"{'':<{width}}{'step s':>9}{'real tok/s':>12}{'padding':>9}{'MFU':>8}{'first loss':>12}{'- xla':>10}")
    for name, row in rows.items():
        xla_loss = rows.get(name.split(" [")[0], {}).get("loss") if "[" in name else None
        print(f"{name:<{width}}{row['seconds']:>9.3f}{real / row['seconds']:>12.0f}{1 - real / row['slots']:>9.1%}"
              f"{flops / row['seconds'] / peak:>8.1%}{row['loss']:>12.6f}"
              + (f"{row['loss'] - xla_loss:>10.1e}" if xla_loss is not None else ""))
    for name, reason in refused.items():
        print(f"{name:<{width}}refused: {reason}")
    unpacked, packed_row = rows["instructor-jax unpacked"], rows["instructor-jax packed"]
    ratio = unpacked["seconds"] / packed_row["seconds"]
    print(f"packed / unpacked: {ratio:.2f}x real tokens/s (target >= 1.3x); packed / pytorch: "
          f"{rows['pytorch (transformers)']['seconds'] / packed_row['seconds']:.2f}x")
    print(f"first-step losses agree: |packed - unpacked| {abs(packed_row['loss'] - unpacked['loss']):.2e}, "
          f"|packed - pytorch| {abs(packed_row['loss'] - torch_loss):.2e} (first JAX steps incl. compile: "
          f"{unpacked['compile']:.1f}s, {packed_row['compile']:.1f}s)")
    return ratio


if __name__ == "__main__":
    main()
