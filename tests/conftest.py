"""Shared fixtures: reference checkpoints made once per session with transformers + sentence-transformers."""

import os

# Several fake CPU devices for the sharded tests; must be set before JAX initializes its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# Faster XLA:CPU compiles for the suite (the subprocesses it starts inherit them): the tiny test models spend
# about 80% of the suite's time in XLA's compiler and almost none computing. Without LLVM's optimisation
# passes and the fusion emitters a tiny train step compiles in ~2 s instead of ~5.5 s. Neither changes what is
# computed (no fast-math either way; matmuls go through the same Eigen kernels), only how fast the code runs;
# the benchmarks in tools/ run with XLA's defaults. INSTRUCTOR_JAX_TEST_XLA_DEFAULTS=1 keeps the defaults.
FAST_COMPILE_FLAGS = () if os.environ.get("INSTRUCTOR_JAX_TEST_XLA_DEFAULTS") else (
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
    "--xla_cpu_use_fusion_emitters=false")
for _flag in FAST_COMPILE_FLAGS:
    if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a subprocess with `devices` fake CPU devices, compiling as fast as the suite does."""
    return " ".join((f"--xla_force_host_platform_device_count={devices}", *FAST_COMPILE_FLAGS))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig, tiny_config  # noqa: E402

# Shapes the parity tests cover: ReLU (T5 v1.0 / GTR / INSTRUCTOR) and gated-GELU (T5 v1.1), several
# layer and head counts, with and without Dense. "nondefault" gives every setting the loader reads a value
# other than its default, so that a wrong default, or a field not read, cannot be copied to both sides.
REFERENCE_CONFIGS = {
    "relu-2x4": tiny_config("relu", num_layers=2, num_heads=4, pooling_rule="sentence-transformers"),
    "gated-gelu-3x2": tiny_config("gated-gelu", num_layers=3, num_heads=2, pooling_rule="sentence-transformers"),
    "relu-1x8-nodense": tiny_config("relu", num_layers=1, num_heads=8, dense_features=None,
                                    pooling_rule="sentence-transformers"),
    "nondefault": InstructorConfig(
        encoder=EncoderConfig(vocab_size=356, d_model=32, d_kv=12, d_ff=48, num_layers=2, num_heads=3,
                              relative_attention_num_buckets=12, relative_attention_max_distance=20,
                              layer_norm_epsilon=1e-2, feed_forward_proj="gated-silu"),
        # do_lower_case stays False: sentence-transformers 6 keeps it only as a Lowercase normalizer inside
        # tokenizer.json, which transformers 5's T5 tokenizer rebuilds on load, so its own reload drops it.
        head=HeadConfig(dense_features=24, dense_bias=True), max_seq_length=48, pooling_rule="sentence-transformers"),
}
REFERENCE_NAMES = list(REFERENCE_CONFIGS)


@pytest.fixture(scope="session")
def reference_models(tmp_path_factory):
    """name -> (directory, sentence-transformers model), saved in the sentence-transformers layout."""
    from instructor_jax.reference import make_reference_checkpoint

    root = tmp_path_factory.mktemp("reference")
    return {name: (root / name, make_reference_checkpoint(root / name, cfg, seed=i))
            for i, (name, cfg) in enumerate(REFERENCE_CONFIGS.items())}


@pytest.fixture(scope="session")
def relu_reference(reference_models):
    return reference_models["relu-2x4"]


@pytest.fixture(scope="session")
def relu_instructor(relu_reference):
    from instructor_jax import Instructor

    return Instructor.from_pretrained(relu_reference[0])
