"""`instructor-jax data mine`: MEDI training data from pairs (hard negatives) or from examples with outputs or
labels (the paper's recipe).

    instructor-jax data mine --model DIR --input PAIRS.jsonl --output MEDI.jsonl \\
        --query_instruction "Represent the question for retrieving answers: " \\
        --document_instruction "Represent the answer for retrieval: " [--corpus DOCS.jsonl] \\
        [--num_negatives 3 --relative_margin 0.05 --sampling top] [--holdout 0.1 --write_eval_task DIR]
    instructor-jax data mine --model DIR --input EXAMPLES.jsonl --output MEDI.jsonl --recipe outputs|labels \\
        --query_instruction "..."

The semantics of the negative filters are sentence-transformers' `mine_hard_negatives` (see
instructor_jax/mining/hard_negatives.py); docs/mining.md has the whole story. The MEDI file and a report
(MEDI.report.json) are written under temporary names and renamed at the end.
"""

from __future__ import annotations

import logging
import shlex
import time
from typing import Callable, Optional

import numpy as np

from instructor_jax.mining import embeddings, hard_negatives, output, pairs as pairs_io, recipe as recipes

log = logging.getLogger(__name__)


def optional_float(text: str) -> Optional[float]:
    """A float, or "none" (the filter off)."""
    if text.strip().lower() in ("none", "off"):
        return None
    return float(text)


def add_arguments(parser) -> None:
    from instructor_jax.runtime.process_flags import add_multiprocess_arguments

    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--model", required=True, help="model directory or hub id to embed with")
    parser.add_argument("--input", required=True, help="pairs JSONL {query, positive (text or list), task?, "
                                                      "query_instruction?, document_instruction?}; with --recipe: "
                                                      "{input, output | label, task?}")
    parser.add_argument("--output", required=True, help="the MEDI JSONL to write (its report goes beside it)")
    parser.add_argument("--corpus", help="documents to mine negatives from, besides the positives (JSONL with "
                                         "'text', or one text per line); default: the positives only")
    parser.add_argument("--query_instruction", help="instruction of queries (inputs) whose line gives none")
    parser.add_argument("--document_instruction", help="instruction of positives, negatives and the corpus whose "
                                                       "line gives none (default: the query instruction)")
    parser.add_argument("--task", default=pairs_io.DEFAULT_TASK, help="task name of lines that give none")
    parser.add_argument("--recipe", choices=("outputs", "labels"),
                        help="pair examples as the INSTRUCTOR paper did instead of mining negatives for pairs")
    filters = parser.add_argument_group("negatives", "sentence-transformers' mine_hard_negatives semantics; "
                                                     "a margin or score of 'none' turns that filter off")
    filters.add_argument("--num_negatives", type=int, default=3, help="negatives per query (default 3)")
    filters.add_argument("--range_min", type=int, default=0, help="skip the first N eligible candidates (0)")
    filters.add_argument("--range_max", type=int, help="consider ranks below N (default: from the others)")
    filters.add_argument("--relative_margin", type=optional_float, default=0.05,
                         help="a negative scores at most positive - |positive| x M (default 0.05)")
    filters.add_argument("--absolute_margin", type=optional_float, help="a negative scores at most positive - M")
    filters.add_argument("--max_score", type=optional_float, help="a negative scores at most this")
    filters.add_argument("--min_score", type=optional_float, help="a negative scores at least this")
    filters.add_argument("--sampling", choices=hard_negatives.SAMPLING, default="top",
                         help="top: the best eligible candidates; random: a seeded draw among them")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sampling random and --holdout (0)")
    parser.add_argument("--holdout", type=float, default=0.0,
                        help="keep this fraction of the queries out of the mined data and report the mining "
                             "model's recall@1/@10 of their positives")
    parser.add_argument("--write_eval_task", metavar="DIR",
                        help="write the held-out pairs as a local retrieval task (for `instructor-jax eval`)")
    parser.add_argument("--approx", action="store_true", help="approximate search (jax.lax.approx_max_k)")
    # 32, not 64: on a 2-core Intel Xeon (tools/bench_mine.py's model) 32 encoded the sample's sentences in
    # 7.7-8.0 s against 9.5-9.6 s for 64, and ~80-word passages in 14.5 s against 17.3 s.
    parser.add_argument("--batch_size", type=int, default=32, help="rows per encoding batch (32)")
    parser.add_argument("--search_batch_size", type=int, default=256, help="queries per search call (256)")
    parser.add_argument("--histogram", action="store_true", help="also MEDI.report.png (the plot extra)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    parser.add_argument("--work_dir", help="where the texts to embed and their embeddings are kept (default: "
                                           "OUTPUT.work); kept after the run, for --resume")
    parser.add_argument("--resume", action="store_true",
                        help="continue the interrupted encoding in --work_dir, or reuse its finished one (same "
                             "texts, model and settings), e.g. to mine again with other filters")
    add_multiprocess_arguments(parser, "takes part in every search, and process 0 writes the output")


def filters_from(args) -> hard_negatives.Filters:
    return hard_negatives.Filters(num_negatives=args.num_negatives, range_min=args.range_min,
                                  range_max=args.range_max, relative_margin=args.relative_margin,
                                  absolute_margin=args.absolute_margin, max_score=args.max_score,
                                  min_score=args.min_score, sampling=args.sampling, seed=args.seed).check()


def mine_pairs(pair_list, embed: Callable, filters: hard_negatives.Filters, search: Callable,
               corpus: Optional[list] = None) -> tuple[list, dict]:
    """MEDI lines for `pair_list` (pairs.Pair), group by group, and the report's counts."""
    lines, removed, positive_values, negative_values = [], {}, [], []
    short = without = rows = queries = 0
    for (task, document_instruction), group in pairs_io.grouped(pair_list).items():
        lay = hard_negatives.layout(group, corpus)
        # One call for both: one length-sorted plan, fewer partly filled batches.
        vectors = embed([list(key) for key in lay.queries] + [[document_instruction, text] for text in lay.corpus])
        query_vectors, corpus_vectors = vectors[:len(lay.queries)], vectors[len(lay.queries):]
        mined = hard_negatives.mine(lay, query_vectors, corpus_vectors, filters, search)
        for name, count in mined.removed.items():
            removed[name] = removed.get(name, 0) + count
        queries += len(lay.queries)
        for q, key in enumerate(lay.queries):
            negatives = mined.negatives[q]
            for p, positive in enumerate(lay.positives[q]):
                rows += 1
                short += len(negatives) < filters.num_negatives
                without += not negatives
                positive_values.append(float(mined.positive_scores[q][p]))
                for row, score in negatives:
                    negative_values.append(score)
                    lines.append(output.medi_line(key, (document_instruction, lay.corpus[positive]),
                                                  (document_instruction, lay.corpus[row]), task))
    report = {"rows_in": sum(len(p.positives) for p in pair_list), "queries": queries, "rows_out": len(lines),
              "pairs": rows, "num_negatives": filters.num_negatives, "removed": removed, "short": short,
              "without_negative": without, "positive_scores": output.distribution(positive_values),
              "negative_scores": output.distribution(negative_values),
              "_positive_values": positive_values, "_negative_values": negative_values}
    return lines, report


def mine_examples(examples, recipe: str, embed: Callable, search: Callable) -> tuple[list, dict]:
    """MEDI lines by the paper's recipe (`outputs` or `labels`) within each task, and the report's counts."""
    lines, skipped = [], 0
    for task in dict.fromkeys(e.task for e in examples):
        group = [e for e in examples if e.task == task]
        texts = [e.input for e in group]
        inputs = embed([[e.query_instruction, e.input] for e in group])
        if recipe == "outputs":
            targets = embed([[e.document_instruction, e.target] for e in group])
            triples = recipes.pair_by_outputs(inputs, targets, texts, search)
        else:
            triples = recipes.pair_by_labels(inputs, [e.target for e in group], texts, search)
        skipped += len(group) - len(triples)
        for i, j, k in triples:
            lines.append(output.medi_line((group[i].query_instruction, texts[i]),
                                          (group[j].document_instruction, texts[j]),
                                          (group[k].document_instruction, texts[k]), task))
    return lines, {"rows_in": len(examples), "queries": len(examples), "rows_out": len(lines), "skipped": skipped}


def items_to_embed(kept, held, corpus=None, recipe: Optional[str] = None) -> list:
    """Every (instruction, text) that `mine_pairs`, `evaluate_holdout` or `mine_examples` will embed for
    these inputs, so that all of them are encoded in one run of encode's machinery (see mining.embeddings)."""
    if recipe:
        return [(e.query_instruction, e.input) for e in kept] + (
            [(e.document_instruction, e.target) for e in kept] if recipe == "outputs" else [])
    items, kept_groups = [], pairs_io.grouped(kept)
    for (_, document_instruction), group in kept_groups.items():
        lay = hard_negatives.layout(group, corpus)
        items += lay.queries + [(document_instruction, text) for text in lay.corpus]
    for key, group in pairs_io.grouped(held).items():
        lay = hard_negatives.layout(group, corpus)
        mining_docs = hard_negatives.layout(kept_groups.get(key, group), corpus).corpus
        items += [(key[1], text) for text in mining_docs + lay.corpus] + lay.queries
    return items


def split_holdout(pair_list, fraction: float, seed: int) -> tuple[list, list]:
    """(kept, held out): a seeded `fraction` of the distinct queries, with all their lines, held out."""
    if fraction <= 0:
        return list(pair_list), []
    keys = list(dict.fromkeys((p.task, p.query_instruction, p.query) for p in pair_list))
    count = int(round(fraction * len(keys)))
    if count < 1 or count >= len(keys):
        raise ValueError(f"--holdout {fraction} of {len(keys)} queries holds out {count}: give a fraction that "
                         "keeps at least one query on each side")
    held = {keys[i] for i in np.random.default_rng(seed).permutation(len(keys))[:count]}
    kept = [p for p in pair_list if (p.task, p.query_instruction, p.query) not in held]
    return kept, [p for p in pair_list if (p.task, p.query_instruction, p.query) in held]


def evaluate_holdout(held, kept, embed: Callable, search: Callable, corpus=None, task_dir=None,
                     overwrite: bool = False) -> dict:
    """Recall@1/@10 of the held-out positives among the group's documents (its mining corpus and the held-out
    positives), with the mining model; optionally each group as a local retrieval task."""
    import pathlib

    recall, kept_groups, held_groups = {}, pairs_io.grouped(kept), pairs_io.grouped(held)
    for (task, document_instruction), group in held_groups.items():
        lay = hard_negatives.layout(group, corpus)
        mining_docs = hard_negatives.layout(kept_groups.get((task, document_instruction), group), corpus).corpus
        documents = list(dict.fromkeys(mining_docs + lay.corpus))
        row = {text: i for i, text in enumerate(documents)}
        relevant = [[row[lay.corpus[p]] for p in positives] for positives in lay.positives]
        found = search(embed([[document_instruction, t] for t in documents]), embed([list(k) for k in lay.queries]),
                       min(10, len(documents))).indices
        hits = {at: np.mean([len(set(found[q, :at]) & set(r)) / min(len(r), at) for q, r in enumerate(relevant)])
                for at in (1, 10)}
        recall[task] = {"pairs": sum(len(r) for r in relevant), "recall@1": round(float(hits[1]), 4),
                        "recall@10": round(float(hits[10]), 4)}
        if task_dir is not None:
            where = pathlib.Path(task_dir) if len(held_groups) == 1 else pathlib.Path(task_dir) / _safe(task)
            output.write_eval_task(where, f"Heldout{_safe(task)}", (lay.queries[0][0], document_instruction),
                                   [text for _, text in lay.queries], documents, relevant, overwrite)
    return {"fraction_of_queries": None, "recall": recall}


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "task"


def run(args) -> int:
    """Reads and checks everything, loads the model, mines, and writes the MEDI file and its report."""
    from instructor_jax.runtime.process_flags import join_processes
    from instructor_jax.search.command import check_output

    start = time.perf_counter()
    check_output(args.output, args.overwrite, [("--input", args.input), ("--corpus", args.corpus)])
    if not 0 <= args.holdout < 1:
        raise ValueError(f"--holdout must be a fraction in [0, 1), got {args.holdout}")
    if args.write_eval_task and not args.holdout:
        raise ValueError("--write_eval_task writes the held-out pairs: give --holdout too (e.g. --holdout 0.1)")
    if args.recipe and (args.holdout or args.corpus):
        raise ValueError("--recipe pairs the examples among themselves; it takes no --corpus or --holdout")
    for name in ("batch_size", "search_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.histogram:
        from instructor_jax.runtime import extras

        extras.require("plot", "data mine --histogram")
    filters = filters_from(args)
    instructions = dict(query_instruction=args.query_instruction, document_instruction=args.document_instruction,
                        task=args.task)
    if args.recipe:
        items = pairs_io.read_examples(args.input, args.recipe, **instructions)
    else:
        items = pairs_io.read_pairs(args.input, **instructions)
    corpus = pairs_io.read_corpus(args.corpus) if args.corpus else None
    kept, held = (items, []) if args.recipe else split_holdout(items, args.holdout, args.seed)

    join_processes(args)
    import jax

    from instructor_jax.encode.corpus_shards import ProcessGroup
    from instructor_jax.instructor import Instructor
    from instructor_jax.runtime.interrupts import Interrupted
    from instructor_jax.search.topk import search as topk_search

    model = Instructor.from_pretrained(args.model)
    work_dir = args.work_dir or embeddings.default_work_dir(args.output)
    group = ProcessGroup.from_jax() if jax.process_count() > 1 else None
    try:
        embed, encoded = embeddings.embedder_for(model, items_to_embed(kept, held, corpus, args.recipe), work_dir,
                                                 resume=args.resume, batch_size=args.batch_size, group=group)
    except KeyboardInterrupt:
        again = ["instructor-jax", *getattr(args, "argv", ["data", "mine", "..."])]
        raise Interrupted(f"interrupted; the embeddings encoded so far are kept in {work_dir}. To continue: "
                          f"{shlex.join(again + ([] if args.resume else ['--resume']))}") from None

    def search(corpus_vectors, query_vectors, k):
        return topk_search(corpus_vectors, query_vectors, k, approx=args.approx, batch_size=args.search_batch_size)

    if args.recipe:
        lines, report = mine_examples(kept, args.recipe, embed, search)
    else:
        lines, report = mine_pairs(kept, embed, filters, search, corpus)
    if held:
        report["holdout"] = evaluate_holdout(held, kept, embed, search, corpus, args.write_eval_task, args.overwrite)
        report["holdout"]["fraction_of_queries"] = args.holdout
    report["embedded"] = {**encoded, "encoded_late": embed.encoded_late, "work_dir": str(work_dir)}
    report["seconds"] = round(time.perf_counter() - start, 2)
    if jax.process_index() == 0:
        histogram = {k: report.pop(k) for k in ("_positive_values", "_negative_values") if k in report}
        output.write_outputs(args.output, lines, report)
        written = [output.report_path(args.output)]
        if args.histogram:
            written.append(output.write_histogram({**report, **histogram},
                                                  output.report_path(args.output)[:-len(".json")] + ".png"))
        print(output.format_report(report), end="")
        print(f"wrote {args.output} ({len(lines)} MEDI lines) and {' and '.join(written)} in "
              f"{report['seconds']:.1f}s; the embeddings stay in {work_dir} (--resume reuses them)")
    return 0
