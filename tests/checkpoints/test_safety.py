"""Safety of convert and loading: --overwrite replaces only our own directories, outputs others can read,
links out of the source, untrusted code and pickles, a full disk, and early, one-line errors."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from instructor_jax import Instructor
from instructor_jax.checkpoints import convert, weights
from instructor_jax.cli import main as cli
from instructor_jax.runtime.fileio import UnsafeLink
from instructor_jax.model.tokenization import InstructionTokenizer


def _cli_error(args, capsys, code=2) -> str:
    with pytest.raises(SystemExit) as exit_:
        cli(args)
    err = capsys.readouterr().err
    assert exit_.value.code == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


def test_overwrite_never_deletes_a_directory_holding_the_source(relu_reference, tmp_path, capsys):
    precious = tmp_path / "precious"
    shutil.copytree(relu_reference[0], precious / "models" / "st")
    (precious / "notes.txt").write_text("mine")
    err = _cli_error(["convert", str(precious / "models" / "st"), str(precious), "--overwrite"], capsys)
    assert "refusing to replace" in err and "contains" in err
    assert (precious / "notes.txt").read_text() == "mine" and (precious / "models" / "st" / "modules.json").exists()


def test_overwrite_replaces_our_own_output_and_nothing_else(relu_reference, tmp_path, capsys):
    out = tmp_path / "out"
    cli(["convert", str(relu_reference[0]), str(out)])
    cli(["convert", str(relu_reference[0]), str(out), "--overwrite", "--to", "pytorch"])  # ours: replaced
    assert (out / "modules.json").exists()
    (out / "README.md").write_text("someone's notes")
    err = _cli_error(["convert", str(relu_reference[0]), str(out), "--overwrite"], capsys)
    assert "it holds README.md, which is not a file this program writes" in err
    package = tmp_path / "package"
    package.mkdir()
    (package / "__init__.py").write_text("")
    assert "no instructor_jax.json" in _cli_error(["convert", str(relu_reference[0]), str(package), "--overwrite"],
                                                  capsys)
    assert (out / "README.md").exists() and (package / "__init__.py").exists()


def test_converted_directories_take_the_umask(relu_reference, tmp_path):
    previous = os.umask(0o022)
    try:
        convert.convert(relu_reference[0], tmp_path / "out")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "out").stat().st_mode & 0o777) == "0o755"
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "out").iterdir()} == {"0o644"}


def test_a_link_out_of_the_source_is_refused(relu_reference, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(relu_reference[0], source)
    (tmp_path / "secret").write_text("-----BEGIN OPENSSH PRIVATE KEY-----")
    (source / "spiece.model").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeLink, match="spiece.model: it is a symbolic link to .*secret"):
        convert.convert(source, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def _as_hub_cache(model, cache):
    """The layout huggingface_hub downloads into: every file a relative link into the repository's blobs/."""
    repo = cache / "models--org--tiny-instructor"
    snapshot = repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        relative = path.relative_to(model)
        blob = f"{abs(hash(relative.as_posix())):040x}"
        shutil.copyfile(path, repo / "blobs" / blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(snapshot.name)
    return snapshot


def test_the_hub_cache_layout_loads_and_converts(relu_reference, relu_instructor, tmp_path):
    snapshot = _as_hub_cache(relu_reference[0], tmp_path / "hub")
    assert (snapshot / "tokenizer.json").is_symlink()
    texts = [["Represent the sentence: ", "a small dog"]]
    np.testing.assert_allclose(Instructor.from_pretrained(snapshot).encode(texts), relu_instructor.encode(texts),
                               atol=1e-6)
    convert.convert(snapshot, tmp_path / "jax")
    assert convert.is_native(tmp_path / "jax") and not (tmp_path / "jax" / "tokenizer.json").is_symlink()


def test_old_torch_is_refused_for_bin_files(tmp_path, monkeypatch):
    import torch

    for safe in ("2.10.0", "2.13.0+cpu", "3.0.0.dev20260101"):
        weights.check_torch_loads_safely(safe, "x.bin")
    monkeypatch.setattr(torch, "__version__", "2.5.1")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(weights.WeightsError, match="refusing to read .*pytorch_model.bin with torch 2.5.1.*CVE-2025-32434"):
        weights.open_weights(tmp_path)


def test_a_tokenizer_directory_never_runs_its_own_code(tmp_path, monkeypatch):
    from instructor_jax.reference import TINY_TOKENIZER

    evil = tmp_path / "evil"
    shutil.copytree(TINY_TOKENIZER, evil)
    config = json.loads((evil / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    config["auto_map"] = {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", "evil_tokenizer.EvilTokenizer"]}
    (evil / "tokenizer_config.json").write_text(json.dumps(config))
    marker = tmp_path / "it-ran"
    (evil / "evil_tokenizer.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))  # a `y` piped in used to run it
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    with pytest.raises(ValueError, match="custom code"):
        InstructionTokenizer.from_directory(evil)
    assert not marker.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(relu_reference, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        err = _cli_error(["convert", str(relu_reference[0]), str(small / "out")], capsys)
        assert "no space left on the device" in err.lower()
        assert list(small.iterdir()) == []  # no staging directory left behind
    finally:
        subprocess.run(["umount", str(small)], check=True)


def test_a_config_that_is_not_an_object_is_one_line(relu_reference, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(relu_reference[0], source)
    (source / "config.json").write_text("[1, 2]")
    err = _cli_error(["convert", str(source), str(tmp_path / "dst")], capsys)
    assert "config.json holds a JSON list, not the object" in err


def test_float16_is_refused_up_front(relu_instructor, tmp_path):
    with pytest.raises(ValueError, match="float16"):
        relu_instructor.encode(["a dog"], instruction="", dtype="float16")
    relu_instructor.save_pretrained(tmp_path / "native")
    with pytest.raises(ValueError, match="float16"):
        Instructor.from_pretrained(tmp_path / "native", dtype="float16")
    import dataclasses

    broken = Instructor(relu_instructor.config.replace(encoder=dataclasses.replace(
        relu_instructor.config.encoder, dtype="float16")), relu_instructor.params, relu_instructor.tokenizer.tokenizer)
    with pytest.raises(ValueError, match="float16"):
        broken.save_pretrained(tmp_path / "broken")
    assert not (tmp_path / "broken").exists()


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, name", [
    ("sentence-transformers", "2_Dense/model.safetensors"), ("sentence-transformers", "model.safetensors"),
    ("sentence-transformers", "tokenizer.json"), ("native", "params.safetensors"),
    ("native", "instructor_jax.json"), ("native", "tokenizer.json")])
def test_every_file_linked_out_of_a_model_directory_is_refused(relu_reference, relu_instructor, tmp_path, layout,
                                                                 name):
    source = tmp_path / "src"
    if layout == "native":
        relu_instructor.save_pretrained(source)
    else:
        shutil.copytree(relu_reference[0], source)
    outside = tmp_path / "elsewhere" / name.replace("/", "_")
    outside.parent.mkdir()
    (source / name).rename(outside)
    (source / name).symlink_to(outside)
    with pytest.raises(UnsafeLink, match=f"{name}: it is a symbolic link to .*elsewhere"):
        convert.convert(source, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()
    with pytest.raises(UnsafeLink, match=f"{name}: it is a symbolic link"):
        Instructor.from_pretrained(source)
    if name == "tokenizer.json":  # a tokenizer directory of its own (a t5x checkpoint's --tokenizer, training's)
        with pytest.raises(UnsafeLink, match="tokenizer.json: it is a symbolic link"):
            InstructionTokenizer.from_directory(source)


def test_a_module_path_out_of_the_model_directory_is_refused(relu_reference, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(relu_reference[0], source)
    shutil.copytree(source / "2_Dense", tmp_path / "Dense")
    modules = json.loads((source / "modules.json").read_text())
    modules[2]["path"] = "../Dense"
    (source / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="places modules outside the model directory"):
        convert.convert(source, tmp_path / "dst")


def test_a_destination_inside_the_source_is_refused_before_writing(relu_reference, tmp_path, capsys):
    source = tmp_path / "src"
    shutil.copytree(relu_reference[0], source)
    before = sorted(p.relative_to(source) for p in source.rglob("*"))
    err = _cli_error(["convert", str(source), str(source / "out")], capsys)
    assert "lies inside" in err and "choose a destination outside it" in err
    assert sorted(p.relative_to(source) for p in source.rglob("*")) == before
