"""t5x checkpoints both ways: written here from random-init PyTorch references (transformers' T5 names, mapped
to t5x_retrieval's by hand, independently of convert.py's table), in every leaf form, then converted and
compared with sentence-transformers' embeddings; round trips are bit-identical; broken ones are named."""

import dataclasses
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from instructor_jax.checkpoints import t5x as t5x_checkpoint, tensor_table
from instructor_jax.cli import build_parser
from instructor_jax.cli import main as cli
from instructor_jax.model.config import tiny_config
from instructor_jax.reference import TINY_TOKENIZER, make_reference_checkpoint, reference_embeddings

# GTR-shaped (pooling over every token: rule "none", include_prompt=True), with bucket counts other than 32.
CONFIGS = {
    "relu-2x4-16buckets": (tiny_config("relu", num_layers=2, num_heads=4, pooling_rule="none"), 16, 128),
    "gated-3x2-8buckets": (tiny_config("gated-gelu", num_layers=3, num_heads=2, pooling_rule="none"), 8, 64),
}
FORMS = ("inline", "zarr", "orbax")
PAIRS = [("Represent the Wikipedia question for retrieving supporting documents: ", "where is the food stored"),
         ("Represent the document for retrieval: ", "Capitalism has been dominant in the Western world."),
         ("", "a text without an instruction"),
         ("Represent the news sentence: ", "The stock fell 3.5% on Tuesday after the report. " * 6)]


def _t5x_target(reference: pathlib.Path, gated: bool, num_layers: int) -> dict:
    """t5x_retrieval's parameter tree from a sentence-transformers GTR directory: kernels are torch weights
    transposed, rel_embedding is [heads, buckets]."""
    from safetensors.numpy import load_file

    w = load_file(str(reference / "model.safetensors"))
    dense = load_file(str(reference / "2_Dense" / "model.safetensors"))
    t = lambda a: np.ascontiguousarray(a.T)  # noqa: E731
    encoder = {"relpos_bias": {"rel_embedding": t(w["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"])},
               "encoder_norm": {"scale": w["encoder.final_layer_norm.weight"]}}
    for i in range(num_layers):
        b = f"encoder.block.{i}.layer"
        encoder[f"layers_{i}"] = {
            "pre_attention_layer_norm": {"scale": w[f"{b}.0.layer_norm.weight"]},
            "attention": {name: {"kernel": t(w[f"{b}.0.SelfAttention.{short}.weight"])}
                          for short, name in zip("qkvo", ("query", "key", "value", "out"))},
            "pre_mlp_layer_norm": {"scale": w[f"{b}.1.layer_norm.weight"]},
            "mlp": {name: {"kernel": t(w[f"{b}.1.DenseReluDense.{name}.weight"])}
                    for name in (["wi_0", "wi_1"] if gated else ["wi"]) + ["wo"]}}
    return {"token_embedder": {"embedding": w["shared.weight"]}, "encoder": encoder,
            "projection_layer": {"kernel": t(dense["linear.weight"])}}


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and "driver" not in value:
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _write_zarr(directory, relative, array, driver):
    import tensorstore as ts

    metadata = {"chunks": [max(1, array.shape[0] // 2), *array.shape[1:]], "compressor": {"id": "gzip", "level": 1},
                "dtype": array.dtype.str, "shape": list(array.shape)}
    store = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(directory / relative)},
                     "metadata": metadata}, create=True).result()
    store.write(array).result()
    return {"driver": "zarr", "kvstore": {"driver": driver, "path": relative}, "metadata": metadata}


def write_t5x(directory: pathlib.Path, target: dict, form: str) -> pathlib.Path:
    """A t5x checkpoint_1000 directory as t5x writes it, with Adafactor-like optimizer state beside the
    parameters. In the legacy forms the state's zarr leaves point at directories that do not exist:
    reading any of them would fail, so a conversion that succeeds has not read optimizer state."""
    from flax import serialization  # the reference encoder t5x itself uses

    directory.mkdir(parents=True)
    flat = _flat(target)
    if form == "orbax":
        import orbax.checkpoint as ocp

        state = {"step": np.asarray(1000, np.int32),
                 "param_states": tensor_table.unflatten_params({f"{k}/v": np.zeros_like(v) for k, v in flat.items()})}
        ocp.PyTreeCheckpointer().save((directory / "state").absolute(), {"target": target, "state": state})
        return directory
    leaves = {}
    for name, array in flat.items():
        dotted = name.replace("/", ".")
        # "zarr": every leaf in zarr, with TensorFlow's "gfile" driver name as the published checkpoints have.
        leaves[name] = _write_zarr(directory, f"target.{dotted}", array, "gfile") if form == "zarr" else array
    param_states = tensor_table.unflatten_params({f"{name}/{slot}": {"driver": "zarr", "kvstore": {"driver": "file",
                                                                             "path": f"state.param_states.{name.replace('/', '.')}.{slot}"},
                                             "metadata": {"shape": [1], "dtype": "<f4"}}
                          for name in flat for slot in ("v_row", "v_col")})
    contents = {"version": 3, "optimizer": {"target": tensor_table.unflatten_params(leaves),
                                             "state": {"step": np.asarray(1000, np.int32), "param_states": param_states}}}
    (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
    return directory


def load_like_t5x(directory: pathlib.Path) -> dict:
    """What t5x's load_t5x_checkpoint gives for `target`: flax msgpack_restore, then every TensorStore spec
    opened relative to the checkpoint directory."""
    import tensorstore as ts
    from flax import serialization

    contents = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
    assert contents["version"] == 3
    out = {}
    for name, leaf in _flat(contents["optimizer"]["target"]).items():
        if isinstance(leaf, dict):
            spec = json.loads(json.dumps(leaf))
            spec["kvstore"]["path"] = str(directory / spec["kvstore"]["path"])
            leaf = ts.open(spec, open=True).result().read().result()
        out[name] = np.asarray(leaf)
    return out


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """name -> (sentence-transformers directory, model, config, t5x target tree)."""
    root = tmp_path_factory.mktemp("t5x_reference")
    out = {}
    for seed, (name, (cfg, buckets, max_distance)) in enumerate(CONFIGS.items()):
        cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, relative_attention_num_buckets=buckets,
                                                      relative_attention_max_distance=max_distance))
        model = make_reference_checkpoint(root / name, cfg, seed=10 + seed)
        out[name] = (root / name, model, cfg, _t5x_target(root / name, cfg.encoder.is_gated, cfg.encoder.num_layers))
    return out


@pytest.fixture(scope="module")
def checkpoints(references, tmp_path_factory):
    """(name, form) -> a t5x checkpoint_1000 directory."""
    root = tmp_path_factory.mktemp("t5x")
    return {(name, form): write_t5x(root / name / form / "checkpoint_1000", ref[3], form)
            for name, ref in references.items() for form in FORMS}


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", CONFIGS)
def test_t5x_to_jax_matches_the_pytorch_reference(references, checkpoints, tmp_path, name, form):
    from instructor_jax import Instructor

    _, model, cfg, _ = references[name]
    extra = [] if cfg.encoder.relative_attention_max_distance == 128 else \
        ["--relative_attention_max_distance", str(cfg.encoder.relative_attention_max_distance)]
    # The model directory (checkpoint_<step> inside), as t5x's find_checkpoint takes it: the latest step.
    cli(["convert", str(checkpoints[name, form].parent), str(tmp_path / "jax"), "--tokenizer", str(TINY_TOKENIZER),
         "--max_seq_length", str(cfg.max_seq_length), *extra])
    ours = Instructor.from_pretrained(tmp_path / "jax")
    got = ours.config
    assert (got.encoder.num_layers, got.encoder.num_heads, got.encoder.d_kv, got.encoder.d_ff,
            got.encoder.relative_attention_num_buckets, got.encoder.feed_forward_proj, got.head.dense_features,
            got.pooling_rule) == (cfg.encoder.num_layers, cfg.encoder.num_heads, cfg.encoder.d_kv, cfg.encoder.d_ff,
                                  cfg.encoder.relative_attention_num_buckets, cfg.encoder.feed_forward_proj,
                                  cfg.head.dense_features, "none")
    np.testing.assert_allclose(ours.encode(PAIRS), reference_embeddings(model, PAIRS), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name,form", [("relu-2x4-16buckets", "inline"), ("gated-3x2-8buckets", "zarr")])
def test_t5x_jax_t5x_round_trip_is_bit_identical(references, checkpoints, tmp_path, name, form):
    target = _flat(references[name][3])
    source = checkpoints[name, form]
    cli(["convert", str(source), str(tmp_path / "jax"), "--tokenizer", str(TINY_TOKENIZER)])
    cli(["convert", str(tmp_path / "jax"), str(tmp_path / "t5x"), "--to", "t5x"])
    _assert_bit_identical(load_like_t5x(tmp_path / "t5x"), target)
    # Our export converts back by itself (the tokenizer and settings travel beside it), and again to the
    # same bytes.
    cli(["convert", str(tmp_path / "t5x"), str(tmp_path / "jax2")])
    cli(["convert", str(tmp_path / "jax2"), str(tmp_path / "t5x2"), "--to", "t5x"])
    files = sorted(p.relative_to(tmp_path / "t5x") for p in (tmp_path / "t5x").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "t5x2") for p in (tmp_path / "t5x2").rglob("*") if p.is_file())
    for relative in files:
        assert (tmp_path / "t5x" / relative).read_bytes() == (tmp_path / "t5x2" / relative).read_bytes(), relative


def test_pytorch_to_t5x_is_the_t5x_retrieval_layout(references, tmp_path):
    directory, _, _, target = references["gated-3x2-8buckets"]
    cli(["convert", str(directory), str(tmp_path / "jax")])
    cli(["convert", str(tmp_path / "jax"), str(tmp_path / "t5x"), "--to", "t5x", "--overwrite"])
    _assert_bit_identical(load_like_t5x(tmp_path / "t5x"), _flat(target))
    # --overwrite replaces our own t5x export.
    cli(["convert", str(tmp_path / "jax"), str(tmp_path / "t5x"), "--to", "t5x", "--overwrite"])


def test_bfloat16_round_trip(checkpoints, tmp_path):
    source = checkpoints["relu-2x4-16buckets", "zarr"]
    cli(["convert", str(source), str(tmp_path / "jax"), "--tokenizer", str(TINY_TOKENIZER), "--dtype", "bfloat16"])
    cli(["convert", str(tmp_path / "jax"), str(tmp_path / "t5x"), "--to", "t5x"])
    exported = load_like_t5x(tmp_path / "t5x")
    assert {a.dtype.name for a in exported.values()} == {"bfloat16"}
    cli(["convert", str(tmp_path / "t5x"), str(tmp_path / "jax2")])
    cli(["convert", str(tmp_path / "jax2"), str(tmp_path / "t5x2"), "--to", "t5x"])
    _assert_bit_identical(load_like_t5x(tmp_path / "t5x2"), exported)


def test_msgpack_encoding_is_flax_serialization():
    import ml_dtypes
    from flax import serialization

    tree = {"version": 3, "optimizer": {"target": {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                                   "b": np.ones(4, ml_dtypes.bfloat16)},
                                        "state": {"step": np.asarray(7, np.int32)}}}
    data = t5x_checkpoint.msgpack_dumps(tree)
    assert data == serialization.msgpack_serialize(tree)
    ours, theirs = _flat(t5x_checkpoint.msgpack_loads(data)), _flat(serialization.msgpack_restore(data))
    assert ours.pop("version") == theirs.pop("version") == 3
    _assert_bit_identical(ours, theirs)


def test_conversion_never_imports_jax(checkpoints, tmp_path):
    source = checkpoints["relu-2x4-16buckets", "zarr"]
    code = (f"import sys; from instructor_jax.checkpoints.convert import convert; "
            f"convert({str(source)!r}, {str(tmp_path / 'jax')!r}, tokenizer={str(TINY_TOKENIZER)!r}); "
            f"convert({str(tmp_path / 'jax')!r}, {str(tmp_path / 't5x')!r}, to='t5x'); "
            "assert 'jax' not in sys.modules and 'tensorflow' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_sentencepiece_model_file_as_tokenizer(checkpoints, tmp_path):
    import sentencepiece as spm

    from instructor_jax import Instructor

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"Represent the document number {i} for retrieval: text {i * 7}" for i in range(300)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "vocab"), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    cli(["convert", str(checkpoints["relu-2x4-16buckets", "inline"]), str(tmp_path / "jax"),
         "--tokenizer", str(tmp_path / "vocab.model")])
    assert (tmp_path / "jax" / "spiece.model").read_bytes() == (tmp_path / "vocab.model").read_bytes()
    model = Instructor.from_pretrained(tmp_path / "jax")
    text = "Represent the document number 12 for retrieval: text 84"
    expected = spm.SentencePieceProcessor(model_file=str(tmp_path / "vocab.model")).encode(text) + [1]
    assert list(model.tokenizer.tokenizer(text)["input_ids"]) == expected
    assert model.encode([("", text)]).shape == (1, 16)


def test_the_help_says_where_the_published_vocabulary_is():
    help_text = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    assert t5x_checkpoint.PUBLISHED_VOCABULARY in " ".join(help_text.split()).replace("gs ://", "gs://").replace(
        "t5- data", "t5-data")


# ----------------------------------------------------------------------------------------------------
# Inconsistent checkpoints: one line naming the tensor, and nothing written to DST


@pytest.fixture
def broken(checkpoints, tmp_path):
    """A copy of a legacy checkpoint and a function that edits its msgpack target."""
    from flax import serialization

    directory = tmp_path / "checkpoint_1000"
    shutil.copytree(checkpoints["gated-3x2-8buckets", "zarr"], directory)

    def edit(change):
        contents = serialization.msgpack_restore((directory / "checkpoint").read_bytes())
        flat = _flat(contents["optimizer"]["target"])
        change(flat)
        contents["optimizer"]["target"] = tensor_table.unflatten_params(flat)
        (directory / "checkpoint").write_bytes(serialization.msgpack_serialize(contents))
        return directory

    return edit


def _fails(source, tmp_path, capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli(["convert", str(source), str(tmp_path / "dst"), *args])
    assert exit_info.value.code == 2
    assert not (tmp_path / "dst").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("dst")]  # no staging directory left either
    return " ".join(capsys.readouterr().err.split())


def test_a_missing_layer_is_named(broken, tmp_path, capsys):
    source = broken(lambda flat: [flat.pop(k) for k in list(flat) if k.startswith("encoder/layers_1/")])
    err = _fails(source, tmp_path, capsys, "--tokenizer", str(TINY_TOKENIZER))
    assert "encoder/layers_1/attention/key/kernel" in err and "lacks" in err


def test_a_misshapen_tensor_is_named(broken, tmp_path, capsys):
    def change(flat):
        flat["encoder/layers_2/mlp/wo/kernel"] = np.zeros((5, 32), np.float32)

    err = _fails(broken(change), tmp_path, capsys, "--tokenizer", str(TINY_TOKENIZER))
    assert "target/encoder/layers_2/mlp/wo/kernel" in err and "[5, 32]" in err and "[64, 32]" in err


def test_a_missing_zarr_directory_is_named(broken, tmp_path, capsys):
    source = broken(lambda flat: None)
    shutil.rmtree(source / "target.encoder.layers_1.mlp.wi_1.kernel")
    err = _fails(source, tmp_path, capsys, "--tokenizer", str(TINY_TOKENIZER))
    assert "target/encoder/layers_1/mlp/wi_1/kernel" in err


def test_settings_the_tensors_contradict_and_a_missing_vocabulary(checkpoints, tmp_path, capsys):
    source = checkpoints["gated-3x2-8buckets", "inline"]
    err = _fails(source, tmp_path, capsys, "--tokenizer", str(TINY_TOKENIZER), "--feed_forward_proj", "relu")
    assert "wi_0" in err
    err = _fails(source, tmp_path, capsys)
    assert "--tokenizer" in err and t5x_checkpoint.PUBLISHED_VOCABULARY in err
    err = _fails(source, tmp_path, capsys, "--tokenizer", str(tmp_path / "nowhere.model"))
    assert "neither a tokenizer directory nor a SentencePiece" in err
