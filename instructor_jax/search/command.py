"""`instructor-jax search`: the top-k corpus rows of each query, one JSONL line per query.

    instructor-jax search --model DIR --corpus EMB --queries Q.jsonl --k 10 --output RESULTS.jsonl

EMB is what `instructor-jax encode` wrote (a .npy, with its ids file given as `--corpus_ids` or found as
EMB.ids.txt; or a multi-process run's manifest). The queries are JSONL (`{"text", "instruction"?, "id"?}`,
encoded with the model; `--instruction` for lines that give none) or a .npy of query embeddings (then no
model is needed). Each output line is `{"query_id", "ids", "scores"}`, best first, ties in corpus order; the
ids are the corpus's own ids, else its row numbers. Written under a temporary name, renamed at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional, Sequence

import numpy as np

from instructor_jax.runtime import jsonl
from instructor_jax.runtime.process_flags import add_multiprocess_arguments, join_processes

log = logging.getLogger(__name__)


def add_arguments(parser) -> None:
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", help="model directory or hub id (needed for JSONL queries)")
    parser.add_argument("--corpus", required=True, help="the corpus embeddings: a .npy or a manifest from `encode`")
    parser.add_argument("--corpus_ids", help="ids file of a single .npy corpus (default: CORPUS.ids.txt if present)")
    parser.add_argument("--queries", required=True, help="JSONL {text, instruction?, id?} per line, or a .npy")
    parser.add_argument("--instruction", help="instruction for query lines that give none")
    parser.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    parser.add_argument("--output", required=True, help="the JSONL results file to write")
    parser.add_argument("--approx", action="store_true",
                        help="jax.lax.approx_max_k per device (fast on TPU; elsewhere an exact sort); the recall "
                             "against exact search is measured on the first batch and reported")
    parser.add_argument("--recall_target", type=float, default=0.95, help="approx_max_k's recall target (0.95)")
    parser.add_argument("--batch_size", type=int, default=256, help="queries per search program call (256)")
    parser.add_argument("--encode_batch_size", type=int, default=64, help="rows per batch when encoding queries")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_multiprocess_arguments(parser, "places its share of the corpus on its devices")


def check_output(path, overwrite: bool, inputs: Sequence[tuple[str, Optional[str]]] = ()) -> None:
    """encode's checks of an output (`corpus.check_outputs`): not a directory, not an existing file without
    --overwrite, and never one of `inputs` ((flag, path) pairs), which writing it would destroy."""
    from instructor_jax.encode.corpus import check_outputs

    for flag, source in [(flag, source) for flag, source in inputs if source is not None] or [("--input", None)]:
        check_outputs(path, overwrite=overwrite, input_path=source, input_flag=flag)


def read_query_file(path, instruction=None) -> tuple[list, list]:
    """(query ids, [instruction, text] pairs) of a JSONL query file; errors name the line."""
    from instructor_jax.search.topk import check_unique_ids

    ids, pairs = [], []
    for number, row in jsonl.numbered_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise ValueError(f"{path}, line {number}: needs a string 'text'")
        given = row.get("instruction", instruction)
        if not isinstance(given, str):
            raise ValueError(f"{path}, line {number}: no 'instruction' and no --instruction to use instead")
        ids.append(row.get("id", len(ids)))
        pairs.append([given, row["text"]])
    if not pairs:
        raise ValueError(f"--queries {path} holds no query")
    check_unique_ids(ids, f"query file {path}")
    return ids, pairs


def open_corpus(path, ids_path=None):
    from instructor_jax.encode.embedding_store import default_merged_ids, open_embeddings

    if ids_path is None and str(path).endswith(".npy") and os.path.exists(default_merged_ids(path)):
        ids_path = default_merged_ids(path)
    return open_embeddings(path, ids=ids_path)


def write_results(path, query_ids, result) -> None:
    from instructor_jax.encode.embedding_store import write_text_atomically

    names = result.ids if result.ids is not None else result.indices.tolist()
    lines = [json.dumps({"query_id": q, "ids": list(n), "scores": [round(float(s), 7) for s in row]})
             for q, n, row in zip(query_ids, names, result.scores)]
    write_text_atomically(path, "".join(line + "\n" for line in lines))


def run(args) -> int:
    check_output(args.output, args.overwrite, [("--queries", args.queries), ("--corpus", args.corpus),
                                               ("--corpus_ids", args.corpus_ids)])
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
    if args.k < 1:
        raise ValueError(f"--k must be a positive integer, got {args.k}")
    if not 0 < args.recall_target <= 1:
        raise ValueError(f"--recall_target must be in (0, 1], got {args.recall_target}")
    join_processes(args)
    import jax

    from instructor_jax.search.topk import ShardedCorpus, check_k, recall, search

    corpus = open_corpus(args.corpus, args.corpus_ids)
    if len(corpus) == 0:
        raise ValueError(f"--corpus {args.corpus} is empty: there is nothing to search")
    check_k(args.k, len(corpus), "--k")
    if str(args.queries).endswith(".npy"):
        queries = np.load(args.queries).astype(np.float32)
        query_ids = list(range(len(queries)))
    else:
        if args.model is None:
            raise ValueError("JSONL queries are encoded with a model: give --model (or give a .npy of query "
                             "embeddings)")
        query_ids, pairs = read_query_file(args.queries, args.instruction)
        from instructor_jax.instructor import Instructor

        queries = Instructor.from_pretrained(args.model).encode(pairs, batch_size=args.encode_batch_size)
    start = time.perf_counter()
    placed = ShardedCorpus(corpus)
    result = search(placed, queries, args.k, approx=args.approx, recall_target=args.recall_target,
                    batch_size=args.batch_size, ids=corpus.ids)
    seconds = time.perf_counter() - start
    if args.approx:
        sample = queries[:min(len(queries), args.batch_size)]
        exact = search(placed, sample, args.k, batch_size=args.batch_size)
        print(f"approx search: recall@{args.k} against exact search {recall(result.indices[:len(sample)], exact.indices):.4f} "
              f"(first {len(sample)} queries, recall_target {args.recall_target})")
    if jax.process_index() == 0:
        write_results(args.output, query_ids, result)
        print(f"wrote {args.output}: top-{args.k} of {len(corpus)} rows for {len(queries)} queries in {seconds:.1f}s "
              f"({len(queries) / max(seconds, 1e-9):.1f} queries/s over {placed.devices} devices)")
    return 0
