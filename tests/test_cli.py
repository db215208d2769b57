"""The embedded default job (the README's first command) and the benchmarks' quick modes."""

import pathlib
import subprocess
import sys

from instructor_jax.cli import main

TOOLS = pathlib.Path(__file__).parents[1] / "tools"


def test_demo_trains_encodes_and_exports(tmp_path, capsys):
    main(["demo", "--workdir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "bit-identical: True" in out and out.rstrip().endswith("demo: OK")


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
