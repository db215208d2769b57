"""Meshes by logical axis rules on 8 fake CPU devices: the same losses, parameters and embeddings as one device."""

import json

import jax
import numpy as np
import pytest

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.runtime import sharding
from instructor_jax.encode.batch_encoder import BatchEncoder
from instructor_jax.model.config import HeadConfig, InstructorConfig
from instructor_jax.model.encoder import init_params, unstack_layers
from instructor_jax.reference import TINY_TOKENIZER
from instructor_jax.train.config import TrainConfig, tiny_encoder
from instructor_jax.train.loop import train

MESHES = {"data=8": (8, 1, 1), "fsdp=8": (1, 8, 1), "data=4,model=2": (4, 1, 2), "data=2,fsdp=2,model=2": (2, 2, 2)}


def _config(mesh_shape, **overrides):
    # adam_eps 1e-3 keeps AdamW from turning rounding-level gradient differences into +-lr steps, so the
    # parameters compare the sharded computation, not Adam's conditioning.
    settings = dict(batch_size=8, max_seq_length=32, total_steps=4, warmup_steps=1, save_every=100, log_every=1,
                    held_out_file=None, peak_flops_per_device=1e11, export=False, adam_eps=1e-3)
    return TrainConfig(**{**settings, **overrides}, mesh_shape=mesh_shape)


def _losses(workdir):
    return [json.loads(line)["loss"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
            if "loss" in line]


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one")
    result = train(workdir, _config((1, 1, 1)), devices=jax.devices()[:1])
    return _losses(workdir), result["params"]


def test_mesh_shapes_resolve():
    assert sharding.resolve_mesh_shape((-1, 2, 1), 8) == (4, 2, 1)
    with pytest.raises(ValueError, match="needs 6 devices, but there are 8"):
        sharding.resolve_mesh_shape((3, 2, 1), 8)
    with pytest.raises(ValueError, match="at most one mesh_shape entry may be -1"):
        sharding.resolve_mesh_shape((-1, -1, 1), 8)
    with pytest.raises(ValueError, match="does not divide 8 devices"):
        sharding.resolve_mesh_shape((3, -1, 1), 8)


def test_a_dcn_mesh_groups_devices_by_granule():
    """One process is one granule here (fake CPU devices name no slice); the 2-process test in
    test_distributed.py trains on a real two-granule mesh."""
    mesh = sharding.make_mesh((-1, 2, 2), dcn_mesh_shape=(-1, 1, 1))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "model": 2}
    assert not sharding.slices_are_granules(jax.devices())
    with pytest.raises(ValueError, match=r"dcn_mesh_shape \(2, 1, 1\) needs 2 processes, but there are 1"):
        sharding.make_mesh((-1, 1, 1), dcn_mesh_shape=(2, 1, 1))


@pytest.mark.parametrize("name", list(MESHES))
def test_training_on_a_mesh_equals_one_device(single_device, tmp_path, name):
    result = train(tmp_path, _config(MESHES[name]))
    np.testing.assert_allclose(_losses(tmp_path), single_device[0], atol=1e-5, rtol=0)
    flat_sharded = jax.tree.leaves(result["params"])
    flat_single = jax.tree.leaves(single_device[1])
    for a, b in zip(flat_sharded, flat_single):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=0)
    # The layout is what the rules say, for every rule, and each Adam moment follows its parameter.
    flat_params = tensor_table.flatten_params(result["params"])
    for parameter, spec in EXPECTED_SPECS.items():
        assert _spec(flat_params[parameter]) == spec, parameter
    moments = _adam_moments(result["opt_state"])
    assert set(moments) == {"mu", "nu"}
    for kind, tree in moments.items():
        for parameter, moment in tensor_table.flatten_params(tree).items():
            assert _spec(moment) == _spec(flat_params[parameter]), (kind, parameter)
    wi = flat_params["encoder/layers_0/mlp/wi"]
    _, fsdp, model = MESHES[name]
    assert wi.addressable_shards[0].data.shape == (64 // fsdp, 128 // model)


# What DEFAULT_RULES make of each kind of parameter (vocab, heads, mlp -> model; embed -> fsdp; the rest
# replicated), whatever the mesh's sizes.
EXPECTED_SPECS = {
    "encoder/token_embedder": ("model", "fsdp"),
    "encoder/relpos_bias/rel_embedding": ("model",),
    "encoder/encoder_norm/scale": ("fsdp",),
    "encoder/layers_1/pre_attention_layer_norm/scale": ("fsdp",),
    "encoder/layers_1/pre_mlp_layer_norm/scale": ("fsdp",),
    "encoder/layers_1/attention/query": ("fsdp", "model"),
    "encoder/layers_1/attention/key": ("fsdp", "model"),
    "encoder/layers_1/attention/value": ("fsdp", "model"),
    "encoder/layers_1/attention/out": ("model", None, "fsdp"),
    "encoder/layers_1/mlp/wi": ("fsdp", "model"),
    "encoder/layers_1/mlp/wo": ("model", "fsdp"),
    "dense/kernel": ("fsdp",),
}


def _spec(array) -> tuple:
    """The array's PartitionSpec as a tuple, trailing Nones dropped (they mean the same)."""
    spec = list(array.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


def _adam_moments(opt_state) -> dict:
    """{"mu": tree, "nu": tree} of AdamW's state inside the optax chain."""
    found = {}
    for state in jax.tree.leaves(opt_state, is_leaf=lambda x: hasattr(x, "mu") and hasattr(x, "nu")):
        if hasattr(state, "mu"):
            found.update(mu=state.mu, nu=state.nu)
    return found


@pytest.mark.parametrize("name", list(MESHES))
def test_encoding_on_a_mesh_equals_one_device(relu_instructor, name):
    pairs = [["Represent the sentence: ", "the old bridge " * k] for k in range(12)]
    tokenized = relu_instructor.tokenizer.tokenize(pairs)
    one = BatchEncoder(relu_instructor.config, relu_instructor.params, devices=jax.devices()[:1])
    mesh = BatchEncoder(relu_instructor.config, relu_instructor.params, mesh=sharding.make_mesh(MESHES[name]))
    expected = one.encode(tokenized, 8, relu_instructor.buckets)
    np.testing.assert_allclose(mesh.encode(tokenized, 8, relu_instructor.buckets), expected, atol=1e-5, rtol=0)


def test_scanned_layers_on_a_mesh_train_like_unrolled_layers_on_one_device(tmp_path):
    """scan_layers (with remat) on data=2,fsdp=2,model=2 against the unrolled model on one device, from the
    same checkpoint; the export goes back to one entry per layer."""
    config = InstructorConfig(tiny_encoder(), HeadConfig(dense_features=64), max_seq_length=32)
    flat = tensor_table.flatten_params(jax.device_get(init_params(config.encoder, config.head, seed=5)))
    (tmp_path / "start").mkdir()
    convert.write_native(tmp_path / "start", config, flat, TINY_TOKENIZER)
    start = str(tmp_path / "start")
    one = train(tmp_path / "one", _config((1, 1, 1), init_from=start), devices=jax.devices()[:1])
    scanned = train(tmp_path / "scan", _config((2, 2, 2), init_from=start, scan_layers=True, remat=True, export=True))
    np.testing.assert_allclose(_losses(tmp_path / "scan"), _losses(tmp_path / "one"), atol=1e-5, rtol=0)
    wi = scanned["params"]["encoder"]["layers"]["mlp"]["wi"]
    assert wi.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model")
    expected = tensor_table.flatten_params(jax.device_get(one["params"]))
    got = unstack_layers(tensor_table.flatten_params(jax.device_get(scanned["params"])))
    exported_config, exported = convert.read_native(tmp_path / "scan" / "model")
    assert got.keys() == expected.keys() == exported.keys()
    assert not exported_config.encoder.scan_layers and not exported_config.encoder.remat
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-5, rtol=0, err_msg=name)
        np.testing.assert_array_equal(exported[name], got[name])


def test_no_involuntary_rematerialization_on_a_3d_mesh(tmp_path, capfd):
    """XLA warns (on stderr, from C++) when the shardings force it to replicate a tensor and slice it again;
    the embedding lookup on fsdp x model meshes did, before its table's embed axis was gathered first."""
    train(tmp_path, _config((2, 2, 2), total_steps=1))
    err = capfd.readouterr().err
    assert "training" in err  # stderr was captured (the progress bar writes there)
    assert "Involuntary full rematerialization" not in err


def _tiny_gin_config(**bindings) -> TrainConfig:
    """configs/tiny.gin as shipped, shortened to a few logged steps."""
    import pathlib

    import gin

    settings = {"total_steps": 4, "warmup_steps": 2, "log_every": 1, "eval_every": 1000, "save_every": 1000,
                "export": False, "held_out_file": None, **bindings}
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(pathlib.Path(__file__).parents[2] / "configs/tiny.gin")],
                                            [f"TrainConfig.{k} = {v!r}" for k, v in settings.items()])
        return TrainConfig()
    finally:
        gin.clear_config()


@pytest.fixture(scope="module")
def tiny_gin_unrolled_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("tiny-unrolled")
    train(workdir, _tiny_gin_config(), devices=jax.devices()[:1])
    return _losses(workdir)


# Scanned + remat on one device, and on a (4, 2, 1) mesh (the unrolled mesh run is
# test_training_on_a_mesh_equals_one_device's; scan without remat is test_model's).
@pytest.mark.parametrize("mesh_shape, scan_layers, remat", [((1, 1, 1), True, True), ((4, 2, 1), True, True)])
def test_scan_layers_is_a_layout_not_a_model(tiny_gin_unrolled_losses, tmp_path, mesh_shape, scan_layers, remat):
    """From scratch, the same seed gives the same model and so the same losses, whatever the layer layout."""
    devices = jax.devices()[:1] if mesh_shape == (1, 1, 1) else None
    train(tmp_path, _tiny_gin_config(scan_layers=scan_layers, remat=remat, mesh_shape=mesh_shape), devices=devices)
    assert len(tiny_gin_unrolled_losses) == 4
    np.testing.assert_allclose(_losses(tmp_path), tiny_gin_unrolled_losses, atol=1e-5, rtol=0)
