"""Time and peak memory of `instructor-jax convert`, both directions, on an instructor-base-shaped checkpoint.

    python tools/bench_convert.py [--size base|large|tiny] [--format safetensors|bin] [--workdir DIR]

Builds a random-init checkpoint of the chosen shape with transformers + sentence-transformers (about 110M
parameters, 440 MB for base), then runs the CLI in a fresh process per direction and reads that process's
peak resident memory from the kernel (wait4). The import baseline (Python, numpy, safetensors, and torch
for .bin sources) is measured the same way and printed beside it. Takes about a minute for base.
"""

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES  # noqa: E402

BUILD = """
from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
from instructor_jax.reference import make_reference_checkpoint
config = InstructorConfig(EncoderConfig(**{shape}), HeadConfig(dense_features=768))
make_reference_checkpoint({path!r}, config, safetensors={safetensors})
"""


def run_measured(argv):
    """(seconds, peak RSS bytes) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv)
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed")
    return elapsed, usage.ru_maxrss * 1024


def weight_bytes(directory):
    return sum(p.stat().st_size for p in pathlib.Path(directory).rglob("*") if p.suffix in (".safetensors", ".bin"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--format", choices=("safetensors", "bin"), default="safetensors")
    parser.add_argument("--workdir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.workdir or tmp)
        source = root / f"{args.size}-{args.format}"
        if not source.exists():
            print(f"building a random {args.size}-shaped checkpoint ({args.format}) in {source} ...", flush=True)
            # In a child process: a forked child inherits this process's peak RSS, so this one stays small.
            subprocess.run([sys.executable, "-c", BUILD.format(
                path=str(source), shape=SIZES[args.size], safetensors=args.format == "safetensors")], check=True)
        size = weight_bytes(source)
        cli = [sys.executable, "-m", "instructor_jax.cli", "convert"]
        imports = "import instructor_jax.checkpoints.convert, safetensors.numpy" + (", torch" if args.format == "bin" else "")
        _, baseline = run_measured([sys.executable, "-c", imports])
        rows = []
        for name, src, dst in (("pytorch -> jax", source, root / "jax"), ("jax -> pytorch", root / "jax", root / "pt")):
            seconds, peak = run_measured(cli + [str(src), str(dst), "--overwrite"])
            rows.append((name, seconds, peak))
        print(f"\ncheckpoint: {args.size} shape, {size / 1e6:.0f} MB of weights ({args.format}); "
              f"import baseline {baseline / 1e6:.0f} MB")
        print(f"{'direction':<16}{'seconds':>9}{'peak RSS MB':>13}{'peak/size':>11}{'(peak-baseline)/size':>22}")
        for name, seconds, peak in rows:
            print(f"{name:<16}{seconds:>9.2f}{peak / 1e6:>13.0f}{peak / size:>11.2f}{(peak - baseline) / size:>22.2f}")


if __name__ == "__main__":
    main()
