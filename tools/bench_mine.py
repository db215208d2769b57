"""`data mine` end to end against sentence-transformers' `mine_hard_negatives`, same pairs, model and machine.

    .venv/bin/python tools/bench_mine.py                      # small model (6 layers, 512 wide), 1024 pairs
    .venv/bin/python tools/bench_mine.py --documents passages  # positives ~80 words, as MS MARCO's passages
    .venv/bin/python tools/bench_mine.py --size tiny --pairs 512

Builds one random-init INSTRUCTOR-shaped model with transformers + sentence-transformers (instructor-jax loads
the same directory), takes the bundled MEDI sample's (query, positive) pairs as one task (or, `--documents passages`, each positive
lengthened into a passage of 6-20 of the sample's sentences), and mines 3 hard
negatives per query, each side with its default batch size (32 both), sentence-transformers' defaults (no margin: a random-init model scores every pair
alike, so that TopK-PercPos's 0.05 would keep nothing), on both sides:

- ours: `instructor-jax data mine` as the command runs it (`instructor_jax.mining.command.run`): read the
  pairs, load the model, encode, search, filter, write MEDI and the report;
- theirs: load `SentenceTransformer(dir)`, build the `datasets.Dataset`, `mine_hard_negatives(...,
  query_prompt=, corpus_prompt=, use_faiss=False)`, write the triplets as JSONL.

Each side runs --repeats times, alternating; the best time counts (ours' first run includes JAX's compiles,
shown apart). Prints the seconds, the ratio, and the share of triples on which the two agree.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from benchlib import SIZES  # noqa: E402

SAMPLE = pathlib.Path(__file__).parents[1] / "instructor_jax" / "assets" / "medi_sample" / "train.jsonl"
QUERY = "Represent the Wikipedia question for retrieving supporting documents: "
DOCUMENT = "Represent the Wikipedia document for retrieval: "
MAX_SEQ_LENGTH = 256


def make_pairs(count: int, documents: str) -> list:
    """(query, positive) pairs of the bundled sample; with `documents="passages"` each positive is a passage:
    the pair's own positive followed by 5-19 other positives of the sample (a seeded draw)."""
    import random

    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    if count > len(rows):
        raise SystemExit(f"--pairs {count}: the sample has {len(rows)} pairs")
    pairs = [{"query": r["query"][1], "positive": r["pos"][1]} for r in rows[:count]]
    if documents == "passages":
        draw, sentences = random.Random(0), [r["pos"][1] for r in rows]
        for pair in pairs:
            pair["positive"] = " ".join([pair["positive"], *draw.sample(sentences, draw.randint(5, 19))])
    return pairs


def theirs(model_dir, lines, output) -> list:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    model = SentenceTransformer(str(model_dir), device="cpu")
    dataset = Dataset.from_dict({"query": [x["query"] for x in lines], "positive": [x["positive"] for x in lines]})
    mined = mine_hard_negatives(dataset, model, num_negatives=3, sampling_strategy="top",
                                query_prompt=QUERY, corpus_prompt=DOCUMENT, verbose=False)
    triples = [(r["query"], r["positive"], r["negative"]) for r in mined]
    with open(output, "w") as f:
        f.writelines(json.dumps({"query": [QUERY, q], "pos": [DOCUMENT, p], "neg": [DOCUMENT, n]}) + "\n"
                     for q, p, n in triples)
    return triples


def ours(model_dir, pairs_path, output) -> list:
    from instructor_jax.mining import command

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    command.run(parser.parse_args(["--model", str(model_dir), "--input", str(pairs_path), "--output", str(output),
                                   "--query_instruction", QUERY, "--document_instruction", DOCUMENT,
                                   "--num_negatives", "3", "--relative_margin", "none", "--overwrite"]))
    records = [json.loads(line) for line in pathlib.Path(output).read_text().splitlines()]
    return [(r["query"][1], r["pos"][1], r["neg"][1]) for r in records]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--pairs", type=int, default=1024, help="pairs of the bundled sample (at most 2048)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--documents", choices=("sentences", "passages"), default="sentences",
                        help="the sample's own positives (~6 words), or passages of 6-20 of them (~80 words, "
                             "the shape of MS MARCO's)")
    args = parser.parse_args(argv)

    import contextlib
    import io

    import jax
    import torch

    from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
    from instructor_jax.reference import make_reference_checkpoint

    lines = make_pairs(args.pairs, args.documents)
    config = InstructorConfig(EncoderConfig(vocab_size=32128, **SIZES[args.size]), HeadConfig(dense_features=768),
                              max_seq_length=MAX_SEQ_LENGTH, pooling_rule="sentence-transformers")
    times = {"ours": [], "sentence-transformers": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        make_reference_checkpoint(tmp / "model", config)
        (tmp / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        for _ in range(args.repeats):
            for name, run in (("ours", lambda: ours(tmp / "model", tmp / "pairs.jsonl", tmp / "ours.jsonl")),
                              ("sentence-transformers", lambda: theirs(tmp / "model", lines, tmp / "theirs.jsonl"))):
                start = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    result = run()
                times[name].append(time.perf_counter() - start)
                if name == "ours":
                    our_triples = result
                else:
                    their_triples = result
    agree = len(set(our_triples) & set(their_triples)) / max(len(their_triples), 1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
          f"({jax.device_count()} {jax.devices()[0].platform} devices), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    words = [len(x["positive"].split()) for x in lines]
    print(f"model {args.size} {SIZES[args.size]}, max_seq_length {MAX_SEQ_LENGTH}; {len(lines)} pairs, documents: "
          f"{args.documents} (mean {sum(words) / len(words):.0f} words), 3 negatives, no margin, sampling top")
    for name, seconds in times.items():
        print(f"  {name:<22} best {min(seconds):7.2f}s  (runs: {', '.join(f'{s:.2f}' for s in seconds)})")
    print(f"  ratio: {min(times['sentence-transformers']) / min(times['ours']):.2f}x sentence-transformers end to end; "
          f"{len(our_triples)} triples ours, {len(their_triples)} theirs, {agree:.4f} of theirs also ours")


if __name__ == "__main__":
    main()
