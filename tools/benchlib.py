"""What the benchmarks in tools/ share: model shapes and the matmul peak they measure MFU against."""

import time

# Encoder shapes of the INSTRUCTOR family (see REFERENCE.md), plus small ones for quick runs.
SIZES = {
    "tiny": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
    "small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8),
    "base": dict(d_model=768, d_kv=64, d_ff=3072, num_layers=12, num_heads=12),
    "large": dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_heads=16),
    "xl": dict(d_model=1024, d_kv=128, d_ff=16384, num_layers=24, num_heads=32),
}


def add_training_layout_arguments(parser) -> None:
    """--unrolled and --prng_impl: the benchmarks default to the real-model configs' settings (scanned
    layers, rbg dropout bits)."""
    parser.add_argument("--unrolled", action="store_true", help="one program per layer instead of one nn.scan")
    parser.add_argument("--prng_impl", default="rbg", help="dropout's generator (TrainConfig.prng_impl)")


def matmul_peaks(dtype: str, n: int = 0) -> dict:
    """Best FLOP/s of an n x n x n matmul in this process, JAX's and torch's."""
    import jax
    import jax.numpy as jnp
    import torch

    backend = jax.default_backend()
    n = n or (4096 if backend == "cpu" else 8192)
    peaks = {}
    jdtype = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jdtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        out = f(a)
    out.block_until_ready()
    peaks["jax"] = 5 * 2 * n ** 3 / (time.perf_counter() - start)
    device = "cuda" if backend == "gpu" else "cpu"
    t = torch.randn(n, n, device=device, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    t @ t
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(5):
        t @ t
    sync()
    peaks["torch"] = 5 * 2 * n ** 3 / (time.perf_counter() - start)
    return peaks


SWITCHES = ("fused_qkv", "bfloat16_elementwise")  # EncoderConfig's measured-lever switches


def add_attention_argument(parser) -> None:
    parser.add_argument("--attention", default="xla",
                        help="comma-separated variants to time side by side, each an attention implementation "
                             "(xla, cudnn, pallas_tpu, auto) optionally with switches: xla+fused_qkv, "
                             "cudnn+fused_qkv+bfloat16_elementwise. Each is compared with xla (parity); one that "
                             "cannot run here is reported as refused, with the reason")


def attention_variants(text: str) -> dict:
    """'xla,cudnn+fused_qkv' -> {'xla': {'attention': 'xla'}, 'cudnn+fused_qkv': {'attention': 'cudnn',
    'fused_qkv': True}}: each variant's EncoderConfig changes, xla first (the parity reference)."""
    from instructor_jax.model.config import ATTENTION_NAMES

    variants = {}
    for label in ["xla", *(v.strip() for v in text.split(",") if v.strip())]:
        implementation, *switches = label.split("+")
        if implementation not in ATTENTION_NAMES or any(s not in SWITCHES for s in switches):
            raise SystemExit(f"--attention: {label!r} is not an implementation of {ATTENTION_NAMES} with switches "
                             f"from {SWITCHES}")
        variants[label] = {"attention": implementation, **{s: True for s in switches}}
    return variants


def is_refusal(error: BaseException) -> bool:
    """Whether `error` is an attention implementation refusing this platform, dtype or shape."""
    from instructor_jax.model.attention import AttentionNotSupported

    return isinstance(error, AttentionNotSupported)
