"""What attention really costs when encoding: the weight `metrics.ATTENTION_COST_WEIGHT` stands for.

    python tools/measure_attention_cost.py [--size small] [--tokens 16384] [--dtype float32|bfloat16]
                                           [--attention xla,cudnn,pallas_tpu]

Encodes the same number of tokens, packed two inputs to a row, in rows of 64, 128, 256 and 512 tokens
with the encoder's packed program on its default devices (on a CPU, the several host devices
instructor_jax asks for). The matmul FLOPs are the same for every row length; the attention FLOPs grow
with it. A least-squares fit of time = a x matmul FLOPs + b x attention FLOPs gives b / a: how many matmul
FLOPs one attention FLOP costs as it runs (its scores' position bias, mask and softmax included), which is
what the layout choices (packed or not, which row lengths) should weigh attention by. With `--attention`,
one fit per implementation (docs/attention.md): a fused kernel that never writes the scores should cost
less per attention FLOP; one that cannot run here is reported as refused.
"""

import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES, add_attention_argument, attention_variants, is_refusal  # noqa: E402

ROW_LENGTHS = (64, 128, 256, 512)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per timed call (a multiple of 512)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per row length; the fastest counts")
    add_attention_argument(parser)
    args = parser.parse_args(argv)

    import jax

    from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.encode.batch_encoder import BatchEncoder
    from instructor_jax.model.encoder import init_params

    encoder = EncoderConfig(vocab_size=32128, **SIZES[args.size])
    head = HeadConfig(dense_features=768)
    params = init_params(encoder, head)
    weights = {}
    for label, changes in attention_variants(args.attention).items():
        batch_encoder = BatchEncoder(InstructorConfig(dataclasses.replace(encoder, **changes), head,
                                                      max_seq_length=max(ROW_LENGTHS)), params)
        try:
            weights[label] = fit(batch_encoder, encoder, head, args)
        except Exception as e:  # an implementation that cannot run here says why, and the others go on
            if not is_refusal(e):
                raise
            print(f"{label}: refused: {e}", flush=True)
            continue
        print(f"{args.size}, {args.dtype}, {label}, {batch_encoder.num_devices} x {jax.devices()[0].device_kind}: one "
              f"attention FLOP costs {weights[label]:.1f} matmul FLOPs (model.flops.ATTENTION_COST_WEIGHT)", flush=True)
    return weights if len(weights) > 1 else weights.get("xla")


def fit(batch_encoder, encoder, head, args) -> float:
    """b / a of the least-squares fit time = a x matmul FLOPs + b x attention FLOPs over the row lengths."""
    from instructor_jax.model.flops import encoder_flops

    program, params = batch_encoder._program(args.dtype, packed=True)
    rng = np.random.default_rng(0)
    seconds, matmul, attention = [], [], []
    for length in ROW_LENGTHS:
        rows = args.tokens // length
        ids = rng.integers(3, encoder.vocab_size, (rows, length)).astype(np.int32)
        segments = np.repeat(np.arange(1, 3, dtype=np.int32), length // 2)[None].repeat(rows, 0)
        arrays = [batch_encoder._put(a) for a in (ids, segments, np.ones_like(ids))]
        program(params, *arrays, max_segments=2, normalize=True).block_until_ready()  # compiles
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            program(params, *arrays, max_segments=2, normalize=True).block_until_ready()
            best = min(best, time.perf_counter() - start)
        segment_lengths = np.full(2 * rows, length // 2)
        flops = encoder_flops(segment_lengths, encoder, head.dense_features)
        # What the program computes: every row's whole [L, L] scores, not only its segments' blocks.
        attention.append(encoder.num_layers * 4 * encoder.num_heads * encoder.d_kv * rows * length ** 2)
        matmul.append(flops - encoder.num_layers * 4 * encoder.num_heads * encoder.d_kv * float(np.sum(segment_lengths ** 2)))
        seconds.append(best)
        print(f"rows of {length:>3}: {rows:>4} rows, {best:.3f} s", flush=True)
    (a, b), *_ = np.linalg.lstsq(np.array([matmul, attention]).T, np.array(seconds), rcond=None)
    return b / a


if __name__ == "__main__":
    main()
