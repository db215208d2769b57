"""A missing extra is exit 2 with one line naming the extra and its pip command, before any work."""

import pathlib
import sys

import pytest

from instructor_jax.cli import main
from instructor_jax.runtime import extras


def run_without(monkeypatch, capsys, modules, argv):
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed
    with pytest.raises(SystemExit) as stop:
        main(argv)
    return stop.value.code, capsys.readouterr().err


@pytest.mark.fast
@pytest.mark.parametrize("modules, argv, extra", [
    (["matplotlib"], ["plot", "--metrics", "m.jsonl", "--output", "out"], "plot"),
    (["sklearn"], ["plot", "--metrics", "m.jsonl", "--method", "tsne", "--output", "out"], "plot"),
    (["mteb"], ["eval", "--model", "m", "--output", "out"], "mteb"),
    (["torch"], ["demo", "--workdir", "demo"], "torch"),
    (["matplotlib"], ["demo", "--workdir", "demo"], "plot"),
    (["fastapi"], ["serve", "--model", "m"], "serve"),
], ids=["plot", "tsne", "eval", "demo-torch", "demo-plot", "serve"])
def test_a_missing_extra_is_one_line_and_exit_2_before_any_work(monkeypatch, capsys, tmp_path, modules, argv, extra):
    monkeypatch.chdir(tmp_path)
    code, err = run_without(monkeypatch, capsys, modules, argv)
    assert code == 2
    assert f"pip install 'instructor-jax[{extra}]'" in err and "internal error" not in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []  # nothing was started: no demo folder, no output


def cli_without(modules, argv):
    """The command in a fresh process where `modules` cannot be imported (as if not installed)."""
    import subprocess

    code = (f"import sys; sys.modules.update(dict.fromkeys({modules!r})); "
            f"from instructor_jax.cli import main; main({argv!r})")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    return result.returncode, result.stderr


def test_build_tfds_checks_its_input_then_names_its_extra(tmp_path):
    code, err = cli_without(["tensorflow_datasets"], [
        "data", "build-tfds", "--input", str(tmp_path / "absent.json"), "--data_dir", str(tmp_path / "d")])
    assert code == 2 and "absent.json" in err
    sample = pathlib.Path(__file__).parents[2] / "instructor_jax" / "assets" / "medi_sample" / "train.jsonl"
    (tmp_path / "medi.jsonl").write_text(sample.read_text().splitlines()[0] + "\n")
    code, err = cli_without(["tensorflow_datasets"], [
        "data", "build-tfds", "--input", str(tmp_path / "medi.jsonl"), "--data_dir", str(tmp_path / "d")])
    assert code == 2 and "pip install 'instructor-jax[tfds]'" in err and not (tmp_path / "d").exists()


def test_a_module_an_input_needs_names_its_extra(tmp_path):
    # Training from a TFDS dataset needs tensorflow-datasets: found out mid-way, still exit 2 and the pip line.
    code, err = cli_without(["tensorflow_datasets"], [
        "train", "--workdir", str(tmp_path / "w"), "--gin_bindings", "TrainConfig.train_file = 'tfds:medi'",
        "--gin_bindings", "TrainConfig.total_steps = 2", "--gin_bindings", "TrainConfig.warmup_steps = 1"])
    assert code == 2 and "pip install 'instructor-jax[tfds]'" in err, err


@pytest.mark.fast
def test_every_extra_named_is_one_setup_cfg_declares():
    import configparser
    import pathlib

    cfg = configparser.ConfigParser()
    cfg.read(pathlib.Path(__file__).parents[2] / "setup.cfg")
    declared = set(cfg["options.extras_require"])
    assert {extras.INSTALLED_BY.get(name, name) for name in extras.EXTRAS} <= declared


def test_no_pytorch_advice_where_torch_is_not_needed(tmp_path):
    # A process without torch (hidden from imports) tokenizes through transformers: no "PyTorch was not found".
    import subprocess

    code = ("import sys; sys.modules['torch'] = None\n"
            "from instructor_jax.reference import TINY_TOKENIZER\n"
            "from instructor_jax.model.tokenization import InstructionTokenizer\n"
            "t = InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=16)\n"
            "print(len(t.tokenize([['Represent: ', 'a text']]).input_ids))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "PyTorch was not found" not in result.stderr + result.stdout
