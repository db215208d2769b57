"""Two-way conversion: bit-identical round trips, the CLI's contract, and errors that name the problem."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from instructor_jax.checkpoints import convert
from instructor_jax.cli import main as cli
from instructor_jax.model.config import tiny_config
from instructor_jax.reference import make_reference_checkpoint
from instructor_jax.checkpoints.weights import WeightsError, open_weights
from tests.conftest import REFERENCE_NAMES


def _same_tensors(a, b):
    ra, rb = open_weights(a), open_weights(b)
    assert sorted(ra.names) == sorted(rb.names)
    for name in ra.names:
        x, y = ra.get(name), rb.get(name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name


@pytest.fixture(scope="module")
def bin_reference(tmp_path_factory):
    """A checkpoint saved as pytorch_model.bin (the hkunlp repositories hold .bin files)."""
    directory = tmp_path_factory.mktemp("bin") / "ref"
    make_reference_checkpoint(directory, tiny_config("gated-gelu", num_layers=2, num_heads=2), seed=5,
                              safetensors=False)
    assert (directory / "pytorch_model.bin").exists()
    return directory


@pytest.mark.parametrize("name", REFERENCE_NAMES)
def test_pytorch_jax_pytorch_is_bit_identical(reference_models, tmp_path, name):
    source = reference_models[name][0]
    assert convert.convert(source, tmp_path / "jax") == "jax"
    assert convert.convert(tmp_path / "jax", tmp_path / "pt") == "pytorch"
    _same_tensors(source, tmp_path / "pt")
    if (source / "2_Dense").exists():
        _same_tensors(source / "2_Dense", tmp_path / "pt" / "2_Dense")


def test_bin_checkpoints_convert_and_round_trip(bin_reference, tmp_path):
    convert.convert(bin_reference, tmp_path / "jax")
    convert.convert(tmp_path / "jax", tmp_path / "pt")
    _same_tensors(bin_reference, tmp_path / "pt")  # .bin in, safetensors out: same tensors


def test_bin_without_torch_says_to_install_it(bin_reference, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(WeightsError, match=r"needs PyTorch: pip install 'instructor-jax\[torch\]'"):
        convert.read_sentence_transformers(bin_reference)


def test_bfloat16_conversion(relu_reference, tmp_path):
    convert.convert(relu_reference[0], tmp_path / "jax16", dtype="bfloat16")
    cfg, params, _ = convert.read_any(tmp_path / "jax16")
    assert cfg.encoder.param_dtype == "bfloat16"
    assert all(v.dtype.name == "bfloat16" for v in params.values())
    convert.convert(tmp_path / "jax16", tmp_path / "pt16")
    assert json.loads((tmp_path / "pt16/config.json").read_text())["dtype"] == "bfloat16"


def test_resaved_instructor_embedding_layout_loads(relu_reference, tmp_path):
    """Copies re-saved with InstructorEmbedding name their folders and types differently; idx decides."""
    source = tmp_path / "my-instructor-copy"
    shutil.copytree(relu_reference[0], source)
    (source / "1_Pooling").rename(source / "1_INSTRUCTOR_Pooling")
    modules = json.loads((source / "modules.json").read_text())
    modules[0]["type"] = "InstructorEmbedding.INSTRUCTOR_Transformer"
    modules[1].update(path="1_INSTRUCTOR_Pooling", type="InstructorEmbedding.INSTRUCTOR_Pooling")
    pooling = json.loads((source / "1_INSTRUCTOR_Pooling/config.json").read_text())
    pooling.pop("include_prompt")  # the hkunlp configs have no such key
    (source / "1_INSTRUCTOR_Pooling/config.json").write_text(json.dumps(pooling))
    (source / "modules.json").write_text(json.dumps(modules[::-1]))  # order in the file must not matter
    cfg, params = convert.read_sentence_transformers(source)
    assert cfg.pooling_rule == "instructor" and cfg.head.dense_features == 16 and cfg.head.normalize
    _, original = convert.read_sentence_transformers(relu_reference[0])
    assert all(np.array_equal(params[k], original[k]) for k in original)


def test_cli_infers_direction_and_refuses_existing_destination(relu_reference, tmp_path, capsys):
    cli(["convert", str(relu_reference[0]), str(tmp_path / "out")])
    assert convert.is_native(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_:
        cli(["convert", str(relu_reference[0]), str(tmp_path / "out")])
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
    cli(["convert", str(relu_reference[0]), str(tmp_path / "out"), "--overwrite", "--to", "pytorch"])
    assert (tmp_path / "out/modules.json").exists() and not convert.is_native(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or retired copies left


def test_failed_conversion_leaves_no_destination(relu_reference, tmp_path, monkeypatch):
    def broken(staging, *args, **kwargs):
        (staging / "params.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(convert, "write_native", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        convert.convert(relu_reference[0], tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # An existing destination (an earlier conversion: --overwrite replaces only those) survives a failed --overwrite.
    monkeypatch.undo()
    convert.convert(relu_reference[0], tmp_path / "out")
    before = (tmp_path / "out/params.safetensors").read_bytes()
    monkeypatch.setattr(convert, "write_native", broken)
    with pytest.raises(RuntimeError):
        convert.convert(relu_reference[0], tmp_path / "out", overwrite=True)
    assert (tmp_path / "out/params.safetensors").read_bytes() == before and len(list(tmp_path.iterdir())) == 1


@pytest.fixture
def broken_copy(relu_reference, tmp_path):
    target = tmp_path / "broken"
    shutil.copytree(relu_reference[0], target)
    return target


def _rewrite_weights(directory, edit):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "model.safetensors"))


def test_missing_weights_file(broken_copy):
    (broken_copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no weights in .*broken.*model.safetensors"):
        convert.read_any(broken_copy)


def test_truncated_weights_file(broken_copy):
    path = broken_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(WeightsError, match="could not read .*model.safetensors.*truncated or corrupt"):
        convert.read_any(broken_copy)


def test_missing_tensor(broken_copy):
    _rewrite_weights(broken_copy, lambda t: t.pop("encoder.block.1.layer.1.DenseReluDense.wo.weight"))
    with pytest.raises(WeightsError, match="lacks 1 tensor.*encoder.block.1.layer.1.DenseReluDense.wo.weight"):
        convert.read_any(broken_copy)


def test_extra_tensor(broken_copy):
    _rewrite_weights(broken_copy, lambda t: t.update({"encoder.block.2.layer.0.layer_norm.weight": np.ones(32, np.float32)}))
    with pytest.raises(WeightsError, match="no place for: encoder.block.2.layer.0.layer_norm.weight"):
        convert.read_any(broken_copy)


def test_misshapen_tensor(broken_copy):
    _rewrite_weights(broken_copy, lambda t: t.update({"encoder.block.0.layer.0.SelfAttention.q.weight": np.ones((32, 31), np.float32)}))
    with pytest.raises(WeightsError, match=r"SelfAttention.q.weight in model.safetensors has shape \[32, 31\]; "
                                           r"the config calls for \[32, 32\]"):
        convert.read_any(broken_copy)


def test_unknown_architecture(broken_copy):
    config = json.loads((broken_copy / "config.json").read_text())
    config.update(model_type="bert", architectures=["BertModel"])
    (broken_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model_type 'bert'.*not supported; instructor-jax loads T5 encoders"):
        convert.read_any(broken_copy)


def test_unsupported_pooling_and_plain_directories(broken_copy, tmp_path):
    (broken_copy / "1_Pooling/config.json").write_text(json.dumps({"embedding_dimension": 32, "pooling_mode": "cls"}))
    with pytest.raises(ValueError, match="pooling mode 'cls' is not supported"):
        convert.read_any(broken_copy)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="neither a sentence-transformers directory"):
        convert.convert(tmp_path / "plain", tmp_path / "out")


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

def test_bfloat16_safetensors_read_without_jax(tmp_path):
    """`convert` runs without JAX, which is what imported ml_dtypes (numpy's bfloat16) before: a fresh process."""
    import ml_dtypes

    from instructor_jax.checkpoints.weights import save_safetensors

    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_safetensors(tmp_path / "model.safetensors", {"w": values.astype(ml_dtypes.bfloat16)})
    script = ("import sys; from instructor_jax.checkpoints.weights import open_weights; "
              "w = open_weights(sys.argv[1]).get('w'); assert 'jax' not in sys.modules; "
              "print(w.dtype, w.astype('float32').tolist())")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(None, 1) == ["bfloat16", f"{values.tolist()}\n"]
