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


# The quick tier (`make test-fast`, `pytest -m fast`): every subpackage, under 3 minutes on 2 cores. Whole
# modules that are quick, and the quick tests of slower ones (by node id, or every parametrization of a name);
# tests may also mark themselves.
FAST_MODULES = {
    "tests/model/test_config.py", "tests/model/test_tokenization.py", "tests/model/test_packing.py",
    "tests/runtime/test_fileio.py", "tests/runtime/test_host_devices.py",
    "tests/checkpoints/test_convert.py", "tests/checkpoints/test_safety.py",
    "tests/checkpoints/test_pooling_evidence.py", "tests/checkpoints/test_t5x.py",
    "tests/encode/test_batch_encoder.py", "tests/encode/test_corpus.py",
    "tests/train/test_data.py", "tests/train/test_gin_files.py",
    "tests/test_instructor.py", "tests/test_plots.py",
}
FAST_TESTS = (
    "tests/model/test_encoder.py::test_relative_position_buckets_match_transformers",
    "tests/model/test_encoder.py::test_hidden_states_match_transformers",
    "tests/model/test_encoder.py::test_every_parameter_has_logical_axes",
    "tests/model/test_encoder.py::test_rms_norm_statistics_are_float32_under_bfloat16",
    "tests/model/test_attention.py::test_each_limit_is_refused_with_its_message",
    "tests/model/test_attention.py::test_limits_that_depend_on_the_gpu_or_on_training",
    "tests/model/test_attention.py::test_auto_is_xla_until_a_device_measures_otherwise",
    "tests/model/test_attention.py::test_xla_attention_is_the_encoder_computation",
    "tests/model/test_attention.py::test_cudnn_arguments_keep_the_shared_bias_and_layout",
    "tests/model/test_attention.py::test_pallas_blocks_and_padding",
    "tests/model/test_attention.py::test_pallas_tpu_forward_and_gradients_equal_xla[float32-L40-packed-padding_row]",
    "tests/model/test_attention.py::test_cudnn_arguments_through_the_xla_backend_equal_xla[bfloat16-L64-unpacked]",
    "tests/train/test_losses.py::test_loss_and_grads_match_torch[1-1-0.05-instructor]",
    "tests/train/test_losses.py::test_loss_and_grads_match_torch[4-3-0.05-in_batch]",
    "tests/train/test_losses.py::test_bad_arguments_raise",
    "tests/train/test_losses.py::test_in_batch_retrieval_accuracy",
    "tests/train/test_step_vs_pytorch.py::test_one_step_matches_pytorch[in_batch]",
    "tests/runtime/test_sharding.py::test_training_on_a_mesh_equals_one_device[data=2,fsdp=2,model=2]",
    "tests/evaluation/test_evaluation.py::test_reference_table_is_packaged_with_its_provenance",
    "tests/evaluation/test_evaluation.py::test_instruction_lookup",
    "tests/evaluation/test_evaluation.py::test_bad_local_task_is_named",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in FAST_MODULES or item.nodeid in FAST_TESTS or item.nodeid.split("[")[0] in FAST_TESTS:
            item.add_marker(pytest.mark.fast)
