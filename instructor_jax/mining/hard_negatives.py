"""Hard negatives with sentence-transformers' `mine_hard_negatives` semantics, searched on the devices.

For one group of pairs (one task, one document instruction), exactly as sentence-transformers 5-6 does:

- the queries are de-duplicated (by instruction and text): a query on several lines, or with a list of
  positives, is one query with all of those positives;
- the corpus is the `--corpus` texts (else the positives) followed by every positive, de-duplicated by exact
  text, first occurrence first;
- each query's candidates are its top `range_max + max_positives + 1` corpus rows by inner product (exact
  search, ties to the lower corpus row), where `max_positives` is the most (query, positive) rows any query
  has, and `range_max` defaults to `range_min + num_negatives + max_positives`, or to
  `range_min + 10 * num_negatives + max_positives` when a margin or `max_score` is set;
- removed from the candidates: the corpus row whose text equals the query's, every positive of the query,
  then those within `absolute_margin` of the query's lowest-scoring positive (score + margin > positive),
  those above `positive - |positive| * relative_margin`, those above `max_score`, those below `min_score`;
- the candidates left, best first, are ranked 0, 1, ...; ranks `range_min` .. `range_max - 1` are eligible
  (ranks count only what the exclusions and filters left);
- `sampling="top"` keeps the first `num_negatives` eligible ones; `"random"` draws `num_negatives` of them
  (numpy's generator seeded by `seed`; sentence-transformers draws with Python's global `random`) and orders
  them best first;
- every positive of a query gets the same negatives: one (query, positive, negative) triple each.

Ties: the search puts the lower corpus row first among equal scores, and the ranking after the filters is a
stable sort, so equal scores keep corpus order everywhere. (sentence-transformers' `torch.topk` leaves the order
of equal scores unspecified; the two agree wherever the scores differ.)
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

SAMPLING = ("top", "random")


@dataclasses.dataclass(frozen=True)
class Filters:
    """Which candidates may become negatives, and how many; the flags of the same names."""

    num_negatives: int = 3
    range_min: int = 0
    range_max: Optional[int] = None
    relative_margin: Optional[float] = 0.05
    absolute_margin: Optional[float] = None
    max_score: Optional[float] = None
    min_score: Optional[float] = None
    sampling: str = "top"
    seed: int = 0

    def check(self) -> "Filters":
        """Raises naming the flag of a setting out of range."""
        if self.num_negatives < 1:
            raise ValueError(f"--num_negatives must be at least 1, got {self.num_negatives}")
        if self.range_min < 0:
            raise ValueError(f"--range_min must be 0 or more, got {self.range_min}")
        if self.range_max is not None and self.range_max <= self.range_min:
            raise ValueError(f"--range_max ({self.range_max}) must be above --range_min ({self.range_min})")
        if self.range_max is not None and self.num_negatives > self.range_max - self.range_min:
            raise ValueError(f"--num_negatives {self.num_negatives} does not fit the ranks --range_min "
                             f"{self.range_min} .. --range_max {self.range_max}: lower --num_negatives or "
                             "--range_min, or raise --range_max")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise ValueError(f"--relative_margin must be in [0, 1) (0.05: a negative scores at most 95% of the "
                             f"positive), got {self.relative_margin}")
        if self.absolute_margin is not None and not 0 <= self.absolute_margin < 2:
            raise ValueError(f"--absolute_margin must be in [0, 2) (scores are cosines), got {self.absolute_margin}")
        for name in ("max_score", "min_score"):
            value = getattr(self, name)
            if value is not None and not -1 <= value <= 1:
                raise ValueError(f"--{name} must be in [-1, 1] (scores are cosines), got {value}")
        if self.max_score is not None and self.min_score is not None and self.min_score > self.max_score:
            raise ValueError(f"--min_score ({self.min_score}) is above --max_score ({self.max_score})")
        if self.sampling not in SAMPLING:
            raise ValueError(f"--sampling must be one of {SAMPLING}, got {self.sampling!r}")
        return self

    def resolved_range_max(self, max_positives: int) -> int:
        if self.range_max is not None:
            return self.range_max
        filtered = self.absolute_margin is not None or self.relative_margin is not None or self.max_score is not None
        return self.range_min + (10 if filtered else 1) * self.num_negatives + max_positives


@dataclasses.dataclass
class Layout:
    """One group's queries (unique [instruction, text]), each one's positives (corpus rows, in order of first
    appearance), the de-duplicated corpus, and where each query's own text is in it (-1: nowhere)."""

    queries: list
    positives: list
    corpus: list
    query_in_corpus: np.ndarray
    max_positives: int


def layout(pairs: Sequence, extra_corpus: Optional[Sequence[str]] = None) -> Layout:
    """sentence-transformers' arrangement of (query, positive) rows; `pairs` have .query_instruction, .query,
    .positives (see `instructor_jax.mining.pairs.Pair`)."""
    rows = [((p.query_instruction, p.query), positive) for p in pairs for positive in p.positives]
    positive_texts = [positive for _, positive in rows]
    corpus = list(dict.fromkeys(list(extra_corpus if extra_corpus is not None else positive_texts) + positive_texts))
    row_of = {text: i for i, text in enumerate(corpus)}
    queries = list(dict.fromkeys(key for key, _ in rows))
    query_row = {key: i for i, key in enumerate(queries)}
    positives: list = [[] for _ in queries]
    counts = [0] * len(queries)
    for key, positive in rows:
        q = query_row[key]
        counts[q] += 1
        if row_of[positive] not in positives[q]:
            positives[q].append(row_of[positive])
    return Layout(queries, positives, corpus, np.array([row_of.get(text, -1) for _, text in queries]), max(counts))


@dataclasses.dataclass
class Mined:
    """Per query: its negatives ([(corpus row, score)], best first) and its positives' scores; the counts of
    candidates each exclusion and filter removed (`removed`), and the candidates considered."""

    negatives: list
    positive_scores: list
    removed: dict
    candidates: int
    range_max: int


def _remove(scores: np.ndarray, mask: np.ndarray, name: str, removed: dict) -> None:
    mask &= scores != -np.inf
    removed[name] = removed.get(name, 0) + int(mask.sum())
    scores[mask] = -np.inf


def filtered_candidates(lay: Layout, found_rows, found_scores, lowest_positive, filters: Filters):
    """The candidate window with every excluded or filtered candidate's score set to -inf, and the counts."""
    scores = np.array(found_scores, np.float32)
    rows = np.asarray(found_rows)
    removed: dict = {}
    _remove(scores, rows == lay.query_in_corpus[:, None], "the query's own text", removed)
    is_positive = np.zeros(rows.shape, bool)
    for q, positive_rows in enumerate(lay.positives):
        is_positive[q] = np.isin(rows[q], positive_rows)
    _remove(scores, is_positive, "positives", removed)
    lowest = lowest_positive[:, None]
    if filters.absolute_margin is not None:
        _remove(scores, scores + np.float32(filters.absolute_margin) > lowest, "absolute_margin", removed)
    if filters.relative_margin is not None:
        threshold = lowest - np.abs(lowest) * np.float32(filters.relative_margin)
        _remove(scores, scores > threshold, "relative_margin", removed)
    if filters.max_score is not None:
        _remove(scores, scores > np.float32(filters.max_score), "max_score", removed)
    if filters.min_score is not None:
        _remove(scores, scores < np.float32(filters.min_score), "min_score", removed)
    return rows, scores, removed


def choose(rows: np.ndarray, scores: np.ndarray, filters: Filters, range_max: int) -> list:
    """Per query, [(row, score)] of the negatives chosen among the eligible ranks."""
    rng = np.random.default_rng(filters.seed)
    order = np.argsort(-scores, axis=1, kind="stable")[:, filters.range_min:range_max]
    chosen = []
    for q in range(len(rows)):
        eligible = [i for i in order[q] if scores[q, i] != -np.inf]
        if filters.sampling == "top":
            picks = eligible[:filters.num_negatives]
        else:
            draw = rng.choice(len(eligible), size=min(filters.num_negatives, len(eligible)), replace=False)
            picks = [eligible[i] for i in sorted(draw)]  # eligible is best first: sorted positions keep that
        chosen.append([(int(rows[q, i]), float(scores[q, i])) for i in picks])
    return chosen


def mine(lay: Layout, query_embeddings: np.ndarray, corpus_embeddings: np.ndarray, filters: Filters,
         search: Callable) -> Mined:
    """Negatives for every query of `lay`. `search(corpus_embeddings, query_embeddings, k)` returns an
    object with `.indices` and `.scores` [queries, k] (instructor_jax.search.search)."""
    filters.check()
    range_max = filters.resolved_range_max(lay.max_positives)
    if filters.range_max is None and filters.num_negatives > range_max - filters.range_min:
        raise ValueError(f"--num_negatives {filters.num_negatives} does not fit the ranks --range_min .. range_max")
    window = range_max + lay.max_positives + 1
    k = min(window, len(lay.corpus))
    found = search(corpus_embeddings, query_embeddings, k)
    found_rows = np.full((len(lay.queries), window), -1, np.int64)
    found_scores = np.full((len(lay.queries), window), -np.inf, np.float32)
    found_rows[:, :k], found_scores[:, :k] = found.indices, found.scores
    positive_scores = [np.einsum("d,nd->n", query_embeddings[q], corpus_embeddings[rows]).astype(np.float32)
                       for q, rows in enumerate(lay.positives)]
    lowest = np.array([s.min() for s in positive_scores], np.float32)
    rows, scores, removed = filtered_candidates(lay, found_rows, found_scores, lowest, filters)
    return Mined(choose(rows, scores, filters, range_max), positive_scores, removed, int(np.isfinite(found_scores).sum()),
                 range_max)
