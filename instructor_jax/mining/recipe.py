"""The INSTRUCTOR paper's pairing recipe (Su et al. 2023, §2.3) for data without pairs, within each task.

- `outputs` (examples with an input x and an output y): the positive of x_i is the x_j (j != i) maximising
  cos(x_i, x_j) + cos(y_i, y_j); its hard negative the x_k maximising cos(x_i, x_k) - cos(y_i, y_k), k not
  the positive. Both are inner products of one search: rows [x_j, y_j] against the queries [x_i, y_i] and
  [x_i, -y_i] (the embeddings are unit-norm, so each half is a cosine).
- `labels` (examples with an input and a label): the positive is the nearest other input with the same
  label, the negative the nearest input with another label. Also one search: rows [x_j, onehot(label_j)],
  queries [x_i, +-LABEL_WEIGHT * onehot(label_i)], so that a same-label row gains (or loses) more than any
  two cosines differ.

An example whose input text equals x_i's (x_i itself included) is never its positive or negative. Ties go to
the lower example (the search's corpus order). An example with no possible positive (a label seen once) or no
negative (a task with one label) is left out and counted.
"""

from __future__ import annotations

import collections
from typing import Callable, Sequence

import numpy as np

LABEL_WEIGHT = 4.0  # > 2, the widest gap between two cosines


def _duplicates(texts: Sequence[str]) -> int:
    return max(collections.Counter(texts).values())


def _first(rows: np.ndarray, texts: Sequence[str], i: int, skip=()) -> int:
    """The first candidate row whose text differs from example i's (and that is not in `skip`), or -1."""
    for j in rows:
        if texts[j] != texts[i] and j not in skip:
            return int(j)
    return -1


def pair_by_outputs(inputs: np.ndarray, outputs: np.ndarray, texts: Sequence[str], search: Callable) -> list:
    """[(i, positive j, negative k)] for each example that has both; inputs and outputs unit-norm [n, d]."""
    n = len(texts)
    if n < 3:
        return []
    k = min(n, _duplicates(texts) + 2)
    rows = np.concatenate([inputs, outputs], axis=1)
    positives = search(rows, np.concatenate([inputs, outputs], axis=1), k).indices
    negatives = search(rows, np.concatenate([inputs, -outputs], axis=1), k).indices
    triples = []
    for i in range(n):
        j = _first(positives[i], texts, i)
        m = _first(negatives[i], texts, i, skip=(j,))
        if j >= 0 and m >= 0:
            triples.append((i, j, m))
    return triples


def pair_by_labels(inputs: np.ndarray, labels: Sequence, texts: Sequence[str], search: Callable) -> list:
    """[(i, positive j, negative k)] for each example that has both; inputs unit-norm [n, d]."""
    n = len(texts)
    names = list(dict.fromkeys(labels))
    if n < 3 or len(names) < 2:
        return []
    onehot = np.zeros((n, len(names)), np.float32)
    onehot[np.arange(n), [names.index(label) for label in labels]] = 1
    k = min(n, _duplicates(texts) + 1)
    rows = np.concatenate([inputs, onehot], axis=1)
    positives = search(rows, np.concatenate([inputs, LABEL_WEIGHT * onehot], axis=1), k).indices
    negatives = search(rows, np.concatenate([inputs, -LABEL_WEIGHT * onehot], axis=1), k).indices
    triples = []
    for i in range(n):
        j = _first(positives[i], texts, i)
        m = _first(negatives[i], texts, i)
        if j >= 0 and m >= 0 and labels[j] == labels[i] and labels[m] != labels[i]:
            triples.append((i, j, m))
    return triples
