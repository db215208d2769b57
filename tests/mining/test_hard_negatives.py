"""`data mine` against sentence-transformers' own `mine_hard_negatives` on the model's sentence-transformers
export, with the same prompts: the same (query, positive, negative) triples, in the same order."""

import json
import pathlib

import numpy as np
import pytest

from instructor_jax.mining import command, embeddings, hard_negatives, pairs as pairs_io
from instructor_jax.search import search

SAMPLE = pathlib.Path(__file__).parents[2] / "instructor_jax" / "assets" / "medi_sample" / "train.jsonl"
QUERY_INSTRUCTION = "Represent the Wikipedia question for retrieving supporting documents: "
DOCUMENT_INSTRUCTION = "Represent the Wikipedia document for retrieval: "


def sample_pairs(count=48):
    """Question-task pairs of the bundled sample; some queries get a second positive (as a list, and as a
    second line), and one positive is another line's query text (which that query must never get)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    rows = [r for r in rows if r["task_name"] == "question"]
    lines = [{"query": r["query"][1], "positive": r["pos"][1]} for r in rows[:count]]
    for i in range(4):
        lines[i]["positive"] = [lines[i]["positive"], rows[count + i]["pos"][1]]
    lines.append({"query": lines[5]["query"], "positive": rows[count + 10]["pos"][1]})
    lines.append({"query": rows[count + 11]["query"][1], "positive": lines[6]["query"]})
    extra_corpus = [r["pos"][1] for r in rows[count + 20:count + 60]]
    return lines, extra_corpus


@pytest.fixture(scope="module")
def setup(relu_instructor, tmp_path_factory):
    from sentence_transformers import SentenceTransformer

    directory = tmp_path_factory.mktemp("mine") / "st"
    relu_instructor.export_sentence_transformers(directory)
    lines, extra = sample_pairs()
    path = directory.parent / "pairs.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    pairs = pairs_io.read_pairs(path, QUERY_INSTRUCTION, DOCUMENT_INSTRUCTION)
    # What `data mine` does: every text the runs below embed, encoded up front by encode's machinery.
    items = command.items_to_embed(pairs, [], None) + command.items_to_embed(pairs, [], extra)
    embed, counts = embeddings.embedder_for(relu_instructor, items, directory.parent / "work", resume=False,
                                            batch_size=32, show_progress_bar=False)
    assert counts["encoded"] == counts["texts"] > len(lines)
    return SentenceTransformer(str(directory), device="cpu"), lines, extra, pairs, embed


def sentence_transformers_triples(st_model, lines, corpus, settings):
    from datasets import Dataset
    from sentence_transformers.util import mine_hard_negatives

    rows = [(line["query"], p) for line in lines
            for p in (line["positive"] if isinstance(line["positive"], list) else [line["positive"]])]
    dataset = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [p for _, p in rows]})
    settings = {**dict(relative_margin=None, num_negatives=3), **settings}
    mined = mine_hard_negatives(dataset, st_model, corpus=corpus, query_prompt=QUERY_INSTRUCTION,
                                corpus_prompt=DOCUMENT_INSTRUCTION, sampling_strategy="top", output_format="triplet",
                                batch_size=32, verbose=False, **settings)
    return [(r["query"], r["positive"], r["negative"]) for r in mined]


def our_triples(pairs, embed, corpus, settings):
    filters = hard_negatives.Filters(**{**dict(relative_margin=None, num_negatives=3), **settings})
    lines, report = command.mine_pairs(pairs, embed, filters, lambda c, q, k: search(c, q, k), corpus)
    records = [json.loads(line) for line in lines]
    assert embed.encoded_late == 0  # items_to_embed planned every text mine_pairs asked for
    assert all(r["query"][0] == QUERY_INSTRUCTION and r["pos"][0] == r["neg"][0] == DOCUMENT_INSTRUCTION
               for r in records)
    return [(r["query"][1], r["pos"][1], r["neg"][1]) for r in records], report


SETTINGS = {
    "top3": {},
    "range": dict(range_min=3, range_max=12, num_negatives=4),
    "relative_margin": dict(relative_margin=0.05),
    "absolute_margin": dict(absolute_margin=0.01),
    "max_score": dict(max_score="p60"),
    "min_score": dict(min_score="p40", num_negatives=5),
    "everything": dict(range_min=1, range_max=20, relative_margin=0.02, max_score="p90", num_negatives=2),
}


def resolve_scores(settings, setup):
    """'pNN': the NN-th percentile of the query-corpus scores, so that the filter removes some candidates."""
    st_model, lines, extra, pairs, embed = setup
    queries = embed([[QUERY_INSTRUCTION, line["query"]] for line in lines])
    documents = embed([[DOCUMENT_INSTRUCTION, t] for t in extra])
    scores = queries @ documents.T
    return {k: float(np.percentile(scores, int(v[1:]))) if isinstance(v, str) else v for k, v in settings.items()}


@pytest.mark.parametrize("name, with_corpus", [
    ("top3", False), ("top3", True), ("range", False), ("relative_margin", True), ("absolute_margin", False),
    ("max_score", True), ("min_score", False), ("everything", True)])
def test_same_negatives_as_sentence_transformers(setup, name, with_corpus):
    st_model, lines, extra, pairs, embed = setup
    settings = resolve_scores(SETTINGS[name], setup)
    corpus = extra if with_corpus else None
    ours, report = our_triples(pairs, embed, corpus, settings)
    theirs = sentence_transformers_triples(st_model, lines, corpus, settings)
    assert ours == theirs
    assert len(ours) > 20
    # The query with a positive equal to another query's text never gets that text as a negative.
    assert not any(q == n for q, _, n in ours)
    filtered = {k for k in ("relative_margin", "absolute_margin", "max_score", "min_score") if k in settings}
    assert filtered <= set(report["removed"]) and all(report["removed"][k] > 0 for k in filtered)


def test_several_positives_share_the_negatives_and_are_never_negatives(setup):
    st_model, lines, extra, pairs, embed = setup
    ours, _ = our_triples(pairs, embed, extra, {})
    first = lines[0]["query"]
    positives = set(lines[0]["positive"])
    rows = [t for t in ours if t[0] == first]
    assert {p for _, p, _ in rows} == positives and len(rows) == 6
    merged = [t for t in ours if t[0] == lines[5]["query"]]
    assert {p for _, p, _ in merged} == {lines[5]["positive"], lines[-2]["positive"]}
    assert not any(n in positives for _, _, n in rows)


def test_random_sampling_is_seeded_and_draws_from_the_eligible(setup):
    st_model, lines, extra, pairs, embed = setup
    top, _ = our_triples(pairs, embed, extra, dict(num_negatives=10, range_max=10))
    eligible = {}
    for q, p, n in top:
        eligible.setdefault(q, []).append(n)
    draws = [our_triples(pairs, embed, extra, dict(num_negatives=3, range_max=10, sampling="random", seed=s))[0]
             for s in (1, 1, 2)]
    assert draws[0] == draws[1] and draws[0] != draws[2]
    for q, p, n in draws[0]:
        assert n in eligible[q]
    # Best first, as sentence-transformers re-sorts its draw.
    picked = [n for q, p, n in draws[0] if q == lines[10]["query"]]
    assert picked == [n for n in eligible[lines[10]["query"]] if n in picked]


def test_layout_ties_and_exclusions():
    """Ties in corpus order; the query's own text and every positive excluded; ranks after the filters."""
    Pair = pairs_io.Pair
    pairs = [Pair(1, "q", ("a", "b"), "t", "", ""), Pair(2, "q", ("a",), "t", "", "")]
    lay = hard_negatives.layout(pairs, ["x", "q", "y", "a", "z"])
    assert lay.corpus == ["x", "q", "y", "a", "z", "b"] and lay.positives == [[3, 5]] and lay.max_positives == 3
    assert list(lay.query_in_corpus) == [1]
    corpus = np.array([[1, 0], [1, 0], [1, 0], [1, 0], [0.5, 0], [2, 0]], np.float32)  # x, q, y tie; a; z; b
    mined = hard_negatives.mine(lay, np.array([[1, 0]], np.float32), corpus,
                                hard_negatives.Filters(num_negatives=2, relative_margin=None), search)
    assert mined.negatives == [[(0, 1.0), (2, 1.0)]]
    assert mined.removed == {"the query's own text": 1, "positives": 2}
    mined = hard_negatives.mine(lay, np.array([[1, 0]], np.float32), corpus,
                                hard_negatives.Filters(num_negatives=1, range_min=1, max_score=0.9,
                                                       relative_margin=None), search)
    assert mined.negatives == [[]]  # x and y removed by max_score: z is rank 0, and range_min skips it
