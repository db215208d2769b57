"""The embedded default job (the README's first command) and the benchmarks' quick modes."""

import os
import pathlib
import subprocess
import sys

from instructor_jax.cli import main

TOOLS = pathlib.Path(__file__).parents[1] / "tools"


def test_demo_trains_encodes_and_exports(tmp_path):
    # As `make demo` runs it: its own process, one CPU device and XLA's default flags (not the suite's 8 fake
    # devices and fast-compile flags, under which its 500 steps take three times as long).
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    result = subprocess.run([sys.executable, "-m", "instructor_jax.cli", "demo", "--workdir", str(tmp_path)],
                            capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "bit-identical: True" in result.stdout and result.stdout.rstrip().endswith("demo: OK")


def _run_tool(name, *args):
    result = subprocess.run([sys.executable, str(TOOLS / name), *args], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_bench_encode_quick():
    out = _run_tool("bench_encode.py", "--quick")
    assert "instructor-jax / sentence-transformers:" in out and "programs" in out


def test_bench_train_quick():
    assert "instructor-jax / pytorch:" in _run_tool("bench_train.py", "--quick")


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
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exit_:
        main(["convert", str(tmp_path / "missing"), str(tmp_path / "b")])  # expected: bad input, exit 2
    assert exit_.value.code == 2
