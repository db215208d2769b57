"""`instructor-jax convert`: a checkpoint between sentence-transformers/PyTorch, t5x and instructor-jax."""

from __future__ import annotations

from instructor_jax.checkpoints.pooling_evidence import add_pooling_rule_argument


def add_parser(commands) -> None:
    convert = commands.add_parser(
        "convert", help="convert a checkpoint between sentence-transformers/PyTorch, t5x and instructor-jax",
        description="Converts SRC into DST. The direction follows from SRC (a sentence-transformers directory "
                    "or a t5x checkpoint becomes instructor-jax, an instructor-jax one becomes "
                    "sentence-transformers) unless --to says otherwise. DST is written under a temporary name "
                    "and renamed at the end.")
    convert.add_argument("src", help="source directory (a t5x checkpoint: its checkpoint_<step> directory), or a "
                                     "hub id such as hkunlp/instructor-large")
    convert.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    convert.add_argument("--to", choices=("jax", "pytorch", "t5x"),
                         help="target format (default: inferred from SRC); t5x writes a legacy t5x checkpoint "
                              "directory (msgpack + zarr) that t5x_retrieval restores")
    convert.add_argument("--dtype", choices=("float32", "bfloat16"), help="cast the weights (default: keep)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    add_pooling_rule_argument(convert)
    t5x = convert.add_argument_group(
        "t5x sources", "A t5x checkpoint's tensors give the encoder's shape (width, heads, head size, "
        "feed-forward size and kind, layers, buckets); these say the rest. Pooling defaults to 'none' (t5x's "
        "mean over every non-padding token), then the Dense projection and L2 norm.")
    t5x.add_argument("--tokenizer", metavar="DIR_OR_MODEL",
                     help="the vocabulary, which a t5x checkpoint does not hold: a tokenizer directory or a "
                          "SentencePiece .model file. The published GTR / sentence-T5 t5x checkpoints use "
                          "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model")
    t5x.add_argument("--relative_attention_max_distance", type=int, metavar="N",
                     help="relative position distance beyond which buckets are shared (default 128, t5x's)")
    t5x.add_argument("--layer_norm_epsilon", type=float, metavar="EPS", help="RMS norm epsilon (default 1e-6)")
    t5x.add_argument("--feed_forward_proj", metavar="[gated-]ACT",
                     help="the MLP's activation (default: relu, or gated-gelu when the checkpoint has "
                          "mlp/wi_0 and wi_1)")
    t5x.add_argument("--max_seq_length", type=int, metavar="N", help="tokens per input (default 512)")
    convert.set_defaults(run=run)


def run(args) -> None:
    import time

    from instructor_jax.checkpoints.convert import convert
    from instructor_jax.checkpoints.t5x import T5xSettings

    start = time.perf_counter()
    settings = T5xSettings(relative_attention_max_distance=args.relative_attention_max_distance,
                           layer_norm_epsilon=args.layer_norm_epsilon, feed_forward_proj=args.feed_forward_proj,
                           max_seq_length=args.max_seq_length)
    direction = convert(args.src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                        pooling_rule=args.pooling_rule, tokenizer=args.tokenizer, t5x_settings=settings)
    formats = {"jax": "instructor-jax", "pytorch": "sentence-transformers / PyTorch", "t5x": "t5x"}
    print(f"wrote {args.dst} ({formats[direction]} format) in {time.perf_counter() - start:.1f}s")

