"""The paper's recipe on hand-made tasks whose right pairs are known, and through the command."""

import json

import numpy as np
import pytest

from instructor_jax.mining import recipe
from instructor_jax.search import search

S = np.float32(np.sqrt(0.5))


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def brute_force_outputs(x, y, texts):
    """float64: positive argmax cos(x_i, x_j) + cos(y_i, y_j), negative argmax cos(x_i, x_k) - cos(y_i, y_k)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    triples = []
    for i in range(len(x)):
        allowed = np.array([texts[j] != texts[i] for j in range(len(x))])
        positive = np.where(allowed, x @ x[i] + y @ y[i], -np.inf)
        j = int(np.argmax(positive))
        negative = np.where(allowed & (np.arange(len(x)) != j), x @ x[i] - y @ y[i], -np.inf)
        triples.append((i, j, int(np.argmax(negative))))
    return triples


def test_outputs_recipe_by_hand():
    # cos(x0, .) = 1, .9, .8, 0 and cos(y0, .) = 1, -.5, 1, 0: the positive of 0 is 2 (.8 + 1), its negative 1
    # (.9 + .5), although 1 is the nearest input.
    x = np.array([[1, 0, 0], [0.9, np.sqrt(0.19), 0], [0.8, 0, 0.6], [0, 1, 0]], np.float32)
    y = np.array([[1, 0], [-0.5, np.sqrt(0.75)], [1, 0], [0, 1]], np.float32)
    texts = ["a", "b", "c", "d"]
    triples = recipe.pair_by_outputs(x, y, texts, search)
    assert triples[0] == (0, 2, 1)
    assert triples == brute_force_outputs(x, y, texts)
    # An example with x_0's text is never its positive or negative: without 2, the positive is 1 (.9 - .5 > 0),
    # and the negative the best of the rest.
    assert recipe.pair_by_outputs(x, y, ["a", "b", "a", "d"], search)[0] == (0, 1, 3)
    assert recipe.pair_by_outputs(x, y, ["a", "b", "a", "d"], search) == brute_force_outputs(x, y, ["a", "b", "a", "d"])


def test_labels_recipe_by_hand():
    x = np.array([[1, 0, 0], [0, 1, 0], [S, S, 0], [0, 0, 1], [0.8, 0, 0.6], [0, 0, -1]], np.float32)
    labels = ["A", "A", "B", "B", "A", "C"]  # C is seen once: no positive for it
    triples = recipe.pair_by_labels(x, labels, list("abcdef"), search)
    # 2's nearest other-label inputs, 0 and 1, tie exactly: the lower one wins. 1's same-label ones tie too.
    assert triples == [(0, 4, 2), (1, 0, 2), (2, 3, 0), (3, 2, 4), (4, 0, 3)]
    assert recipe.pair_by_labels(x[:2], ["A", "B"], ["a", "b"], search) == []
    assert recipe.pair_by_labels(x, ["A"] * 6, list("abcdef"), search) == []


def test_recipe_command(relu_instructor, relu_reference, tmp_path):
    from tests.mining.test_command import parse
    from instructor_jax.mining import command

    rng = np.random.default_rng(0)
    words = ["river", "bank", "loan", "water", "fish", "money", "boat", "rate", "tree", "bird"]
    lines = [{"input": " ".join(rng.choice(words, 4)), "output": " ".join(rng.choice(words, 3)), "task": "gen"}
             for _ in range(12)]
    path = tmp_path / "examples.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "medi.jsonl"
    instruction = "Represent the text for finding similar examples: "
    command.run(parse(["--model", str(relu_reference[0]), "--input", str(path), "--output", str(out), "--recipe",
                       "outputs", "--query_instruction", instruction]))
    records = [json.loads(line) for line in out.read_text().splitlines()]
    texts = [line["input"] for line in lines]
    x = relu_instructor.encode(texts, instruction=instruction)
    y = relu_instructor.encode([line["output"] for line in lines], instruction=instruction)
    expected = brute_force_outputs(x, y, texts)
    assert [(r["query"][1], r["pos"][1], r["neg"][1]) for r in records] == \
        [(texts[i], texts[j], texts[k]) for i, j, k in expected]
    assert {r["task_name"] for r in records} == {"gen"}
