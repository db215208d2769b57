"""The embedded default job (the README's first command) and the benchmarks' quick modes."""

import os
import pathlib
import re
import subprocess
import sys

import pytest

from instructor_jax.cli import main

REPO = pathlib.Path(__file__).parents[1]
TOOLS = REPO / "tools"


def test_demo_trains_encodes_and_exports(tmp_path):
    # As `make demo` runs it: its own process, one CPU device and XLA's default flags (not the suite's 8 fake
    # devices and fast-compile flags, under which its 500 steps take three times as long).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "instructor_jax.cli", "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-identical: True" in result.stdout and result.stdout.rstrip().endswith("demo: OK")
    # The model is kept where the demo says, with the next commands.
    assert (tmp_path / "run" / "model" / "params.safetensors").exists()
    assert f"The trained model is in {tmp_path / 'run' / 'model'} (kept)" in result.stdout
    assert "instructor-jax encode --model" in result.stdout and (tmp_path / "pictures" / "embedding_map.png").exists()
    # The README's figure is this run's: a stale one fails here. The demo is deterministic on one machine, but
    # XLA's CPU kernels differ between processors: 0.953 here, 0.961 on another 2-core machine (1.5 of the 192
    # held-out triples), so the trained figure may differ by a hundredth, the untrained one not at all.
    printed = re.search(r"held-out in-batch accuracy (\d\.\d{3}) -> (\d\.\d{3})", result.stdout).groups()
    readme = re.search(r"\((\d\.\d{3}) -> (\d\.\d{3}) on 2 CPU cores", (REPO / "README.md").read_text()).groups()
    assert readme[0] == printed[0] and abs(float(readme[1]) - float(printed[1])) <= 0.01, (
        f"README says {readme}, the demo printed {printed}: update the README")


@pytest.mark.fast
def test_a_demo_rerun_replaces_only_its_own_folder(tmp_path):
    from instructor_jax.demo import MARKER, prepare_workdir

    ours = prepare_workdir(tmp_path / "demo")
    (ours / "run" / "model").mkdir(parents=True)
    assert prepare_workdir(ours) == ours and not (ours / "run").exists() and (ours / MARKER).exists()
    (ours / "run" / "checkpoints").mkdir(parents=True)  # interrupted before its export: resumed, not replaced
    assert prepare_workdir(ours) == ours and (ours / "run" / "checkpoints").exists()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not written by instructor-jax demo"):
        prepare_workdir(theirs)
    assert (theirs / "notes.txt").read_text() == "mine"


def _run_tool(name, *args):
    result = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_bench_encode_quick():
    # An implementation this CPU cannot run is reported as refused, and the others go on.
    out = _run_tool("bench_encode.py", "--quick", "--attention", "pallas_tpu")
    assert "instructor-jax / sentence-transformers:" in out and "programs" in out
    assert "instructor-jax packed [pallas_tpu]" in out and "refused: attention='pallas_tpu' runs on TPUs" in out


def test_bench_train_quick():
    out = _run_tool("bench_train.py", "--quick", "--attention", "cudnn")
    assert "instructor-jax / pytorch:" in out and "refused: attention='cudnn' runs on NVIDIA GPUs" in out


def test_bench_convert_tiny(tmp_path):
    out = _run_tool("bench_convert.py", "--size", "tiny", "--workdir", str(tmp_path))
    assert "pytorch -> jax" in out and "jax -> pytorch" in out


def test_one_error_path_one_line_and_a_traceback_only_with_v(tmp_path, capsys, monkeypatch):
    import pytest

    import instructor_jax.checkpoints.convert

    def bug(*args, **kwargs):
        raise RuntimeError("something unforeseen\nwith a second line")

    monkeypatch.setattr(instructor_jax.checkpoints.convert, "convert", bug)
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(tmp_path / "a"), str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "internal error: RuntimeError: something unforeseen with a second line (rerun with -v" in err
    with pytest.raises(RuntimeError, match="something unforeseen"):
        main(["-v", "convert", str(tmp_path / "a"), str(tmp_path / "b")])
    with pytest.raises(RuntimeError, match="something unforeseen"):  # -v after the subcommand works too
        main(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "-v"])
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(tmp_path / "missing"), str(tmp_path / "b")])  # expected: bad input, exit 2
    assert exit_.value.code == 2


@pytest.mark.fast
def test_train_leaves_no_gin_bindings_behind(tmp_path):
    # In one process (tests, a notebook), a failed run's bindings must not reach the next TrainConfig().
    from instructor_jax.train.config import TrainConfig

    with pytest.raises(SystemExit) as exit_:
        main(["train", "--workdir", str(tmp_path / "w"), "--gin_bindings", "TrainConfig.batch_size = 0"])
    assert exit_.value.code == 2
    assert TrainConfig().batch_size == TrainConfig.__dataclass_fields__["batch_size"].default
