"""MEDI as a TFDS dataset: built from the bundled sample without TensorFlow, in file order, and a training
run from `tfds:medi` that logs the same losses as one from the JSONL."""

import json
import pathlib
import sys

import pytest

from instructor_jax.train import data, medi
from instructor_jax.cli import main as cli
from instructor_jax.train.config import TrainConfig
from instructor_jax.train.loop import train

SAMPLE = TrainConfig().train_file


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    cli(["data", "build-tfds", "--input", SAMPLE, "--data_dir", str(directory)])
    return directory


def test_records_keep_the_file_order(data_dir):
    source = data.open_examples("tfds:medi", tfds_data_dir=str(data_dir))
    examples = medi.read_medi(SAMPLE)
    assert len(source) == len(examples)
    assert [source[i] for i in range(len(source))] == examples
    assert source.tasks == [e.task for e in examples]


def test_tensorflow_is_never_imported(data_dir):
    data.open_examples("tfds:medi", tfds_data_dir=str(data_dir))[0]
    assert "tensorflow_datasets" in sys.modules  # the builder and the reader above ran through TFDS
    assert "tensorflow" not in sys.modules


def test_a_dataset_that_is_not_built_says_how_to_build_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="instructor-jax data build-tfds"):
        data.open_examples("tfds:medi", tfds_data_dir=str(tmp_path))


def test_training_from_tfds_logs_the_same_losses_as_from_the_jsonl(data_dir, tmp_path):
    # The demo's run (configs/tiny.gin: the TrainConfig defaults), shortened as tests/train/test_loop.py does:
    # a few steps of 8-example batches of 32 tokens, no held-out evaluation.
    settings = dict(batch_size=8, max_seq_length=32, total_steps=4, warmup_steps=1, log_every=1, eval_every=1000,
                    save_every=1000, held_out_file=None, peak_flops_per_device=1e11, export=False)

    def losses(workdir):
        rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    import jax

    one_device = jax.devices()[:1]  # the data path is under test, not the mesh: one device compiles fastest
    train(tmp_path / "jsonl", TrainConfig(**settings), devices=one_device)
    train(tmp_path / "tfds", TrainConfig(train_file="tfds:medi", tfds_data_dir=str(data_dir), **settings),
          devices=one_device)
    assert sorted(losses(tmp_path / "jsonl")) == [1, 2, 3, 4]
    assert losses(tmp_path / "tfds") == losses(tmp_path / "jsonl")


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

def test_building_into_a_built_data_dir_is_refused_unless_overwrite(tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(pathlib.Path(SAMPLE).read_text().splitlines(keepends=True)[:5]))
    directory = tmp_path / "tfds"
    cli(["data", "build-tfds", "--input", SAMPLE, "--data_dir", str(directory)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(["data", "build-tfds", "--input", str(small), "--data_dir", str(directory)])
    assert exit_.value.code == 2 and "already holds a built medi dataset; pass --overwrite" in capsys.readouterr().err
    assert len(data.open_examples("tfds:medi", tfds_data_dir=str(directory))) == 2048  # kept, untouched
    cli(["data", "build-tfds", "--input", str(small), "--data_dir", str(directory), "--overwrite"])
    assert ": 5 records" in capsys.readouterr().out
    source = data.open_examples("tfds:medi", tfds_data_dir=str(directory))
    assert [source[i] for i in range(len(source))] == medi.read_medi(small) and len(source.tasks) == 5


@pytest.mark.fast
@pytest.mark.parametrize("name, content", [("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("list.json", "[]")])
def test_an_input_without_records_is_refused_before_anything_is_written(tmp_path, capsys, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(SystemExit) as exit_:
        cli(["data", "build-tfds", "--input", str(tmp_path / name), "--data_dir", str(tmp_path / "d")])
    assert exit_.value.code == 2 and "holds no MEDI records" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.fast
def test_a_missing_input_is_said_before_tfds_is_imported(tmp_path, capsys, monkeypatch):
    import instructor_jax.train

    monkeypatch.delitem(sys.modules, "instructor_jax.train.tfds_medi", raising=False)
    monkeypatch.delattr(instructor_jax.train, "tfds_medi", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as without the tfds extra
    with pytest.raises(SystemExit) as exit_:
        cli(["data", "build-tfds", "--input", str(tmp_path / "nope.jsonl"), "--data_dir", str(tmp_path / "d")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "nope.jsonl does not exist or is not a file" in err, err


@pytest.mark.fast
def test_opening_a_dataset_that_is_not_built_creates_no_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="instructor-jax data build-tfds"):
        data.open_examples("tfds:medi", tfds_data_dir=str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()
