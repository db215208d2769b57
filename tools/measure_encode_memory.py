"""Peak memory of `instructor-jax encode` on long documents: 2,000 documents of 20 KB must stay under 1 GB.

    python tools/measure_encode_memory.py [--docs 2000] [--kb 20] [--batch_size 16] [--limit_mb 1024] [--workdir DIR]

Builds a random-init INSTRUCTOR-shaped model (tiny widths, the real max_seq_length of 512, the bundled
tiny tokenizer, whose small vocabulary makes more tokens per byte than a real one: the worst case for
tokenization), writes the corpus as JSONL, runs the CLI in a fresh process and reads that process's peak
resident memory from the kernel (wait4). Also runs the same command on an empty corpus, so the figure can
be read against what importing JAX and loading the model cost. Exits 1 if the peak is over --limit_mb.

What is measured is what the corpus costs: its reading and tokenization, which grew with the documents'
full length before tokenization truncated. The model's own activations grow with --batch_size instead:
at 512 tokens each attention layer holds batch x heads x 512 x 512 float32 scores (64 x 4 heads: 268 MB,
a few such arrays at a time), so the default batch of the CLI, 64, is over 1 GB here on its own; 16 is
the batch measured.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

BUILD = """
from instructor_jax.model.config import tiny_config
from instructor_jax.reference import make_reference_checkpoint
make_reference_checkpoint({path!r}, tiny_config(max_seq_length=512))
"""

WORDS = ("river stone a small dog follows the heavy rain over green hills while quiet towns sleep and "
         "markets open early capitalism feudalism tuber yam plant stores food underground").split()


def run_measured(argv):
    """(seconds, peak RSS bytes) of a child process."""
    start = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed")
    return time.perf_counter() - start, usage.ru_maxrss * 1024


def write_corpus(path: pathlib.Path, docs: int, kb: int) -> None:
    import random

    rng = random.Random(0)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(docs):
            words, size = [], 0
            while size < kb * 1024:
                words.append(rng.choice(WORDS))
                size += len(words[-1]) + 1
            f.write(json.dumps({"id": i, "instruction": "Represent the document for retrieval: ",
                                "text": " ".join(words)}) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=2000)
    parser.add_argument("--kb", type=int, default=20, help="size of each document in KB")
    parser.add_argument("--batch_size", type=int, default=16, help="encode --batch_size")
    parser.add_argument("--limit_mb", type=float, default=1024)
    parser.add_argument("--workdir")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(args.workdir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        model = root / "model"
        if not model.exists():
            # In a child process: a forked child inherits its parent's peak RSS, so this one stays small.
            subprocess.run([sys.executable, "-c", BUILD.format(path=str(model))], check=True)
        corpus, empty = root / "corpus.jsonl", root / "empty.jsonl"
        write_corpus(corpus, args.docs, args.kb)
        empty.write_text("")
        command = [sys.executable, "-m", "instructor_jax.cli", "encode", "--model", str(model), "--quiet",
                   "--overwrite", "--batch_size", str(args.batch_size)]
        _, baseline = run_measured([*command, "--input", str(empty), "--output", str(root / "empty.npy")])
        seconds, peak = run_measured([*command, "--input", str(corpus), "--output", str(root / "out.npy")])
    mb = peak / 2 ** 20
    print(f"encode of {args.docs} documents of {args.kb} KB, batch {args.batch_size}: peak RSS {mb:.0f} MB in {seconds:.1f}s "
          f"(limit {args.limit_mb:.0f} MB; the same command on an empty corpus: {baseline / 2 ** 20:.0f} MB)")
    if mb > args.limit_mb:
        raise SystemExit(f"peak RSS {mb:.0f} MB is over the limit of {args.limit_mb:.0f} MB")


if __name__ == "__main__":
    main()
