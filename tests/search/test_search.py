"""Sharded top-k against a float64 numpy brute force: 1 device, 8 devices, 2 processes; the command; bad input."""

import json
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from instructor_jax.runtime import sharding
from instructor_jax.search import command, search
from instructor_jax.search.topk import ShardedCorpus, recall
from tests.runtime.test_distributed import REPO, child_env, free_port

K = 10


def make_data(rows=1000, dim=32, queries=40, seed=0):
    rng = np.random.default_rng(seed)
    corpus = rng.normal(size=(rows, dim)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    # Exact ties: the same row three times, and a query equal to it (the tie is at the top).
    corpus[[500, 900]] = corpus[3]
    corpus[[601, 602]] = corpus[77]
    queries_ = rng.normal(size=(queries, dim)).astype(np.float32)
    queries_ /= np.linalg.norm(queries_, axis=1, keepdims=True)
    queries_[0], queries_[1] = corpus[3], corpus[77]
    return corpus, queries_


def brute_force(corpus, queries_, k):
    """float64 scores; descending, and the lower row first among equal scores (a stable sort)."""
    scores = queries_.astype(np.float64) @ corpus.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


@pytest.fixture(scope="module")
def data():
    corpus, queries_ = make_data()
    return corpus, queries_, *brute_force(corpus, queries_, K)


def check(result, expected_ids, expected_scores):
    np.testing.assert_array_equal(result.indices, expected_ids)
    np.testing.assert_allclose(result.scores, expected_scores, rtol=0, atol=1e-5)


def test_one_device(data):
    corpus, queries_, ids, scores = data
    mesh = sharding.make_mesh((-1, 1, 1), devices=jax.devices()[:1])
    check(search(corpus, queries_, K, mesh=mesh), ids, scores)


def test_eight_devices_ties_in_corpus_order(data):
    corpus, queries_, ids, scores = data
    assert jax.device_count() == 8
    placed = ShardedCorpus(corpus)
    assert placed.devices == 8 and placed.array.addressable_shards[0].data.shape[0] < len(corpus)
    result = search(placed, queries_, K, batch_size=16)  # 3 batches, the last one padded
    check(result, ids, scores)
    assert list(result.indices[0, :3]) == [3, 500, 900] and list(result.indices[1, :3]) == [77, 601, 602]
    # k = every row, and k spanning several devices' slices.
    full = search(placed, queries_[:3], len(corpus))
    check(full, *brute_force(corpus, queries_[:3], len(corpus)))


def test_approx_falls_back_to_exact_on_cpu_and_reports_recall(data, caplog):
    corpus, queries_, ids, _ = data
    with caplog.at_level("WARNING"):
        result = search(corpus, queries_, K, approx=True, recall_target=0.9)
    assert recall(result.indices, ids) == 1.0
    assert recall(ids[:, ::-1][:, :K], ids) == 1.0 and recall(np.roll(ids, 1, axis=0), ids) < 0.1


def test_bad_input(data):
    corpus, queries_, _, _ = data
    with pytest.raises(ValueError, match=r"k=1001 is above the corpus size \(1000 rows\)"):
        search(corpus, queries_, 1001)
    with pytest.raises(ValueError, match="the corpus is empty"):
        search(np.zeros((0, 32), np.float32), queries_, 1)
    with pytest.raises(ValueError, match=r"the id 'a' twice \(rows 0 and 2\)"):
        search(corpus[:3], queries_, 1, ids=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"\[count, 32\]"):
        search(corpus, queries_[:, :8], 1)


def write_corpus(tmp_path, corpus, ids=True):
    np.save(tmp_path / "emb.npy", corpus)
    if ids:
        (tmp_path / "emb.ids.txt").write_text("".join(f"doc{i}\n" for i in range(len(corpus))))
    return tmp_path / "emb.npy"


def parse(argv):
    import argparse

    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_command_on_npy_queries_and_errors(data, tmp_path, capsys):
    corpus, queries_, ids, scores = data
    emb = write_corpus(tmp_path, corpus)
    np.save(tmp_path / "q.npy", queries_)
    out = tmp_path / "results.jsonl"
    args = ["--corpus", str(emb), "--queries", str(tmp_path / "q.npy"), "--output", str(out), "--k", str(K)]
    assert command.run(parse(args + ["--approx"])) == 0
    assert "recall@10 against exact search 1.0000" in capsys.readouterr().out
    rows = read_results(out)
    assert [r["ids"] for r in rows] == [[f"doc{i}" for i in row] for row in ids.tolist()]
    np.testing.assert_allclose([r["scores"] for r in rows], scores, atol=1e-5)
    with pytest.raises(FileExistsError, match="--overwrite"):
        command.run(parse(args))
    bad = tmp_path / "bad.jsonl"
    with pytest.raises(ValueError, match=r"--k=1001 is above the corpus size"):
        command.run(parse(args[:-1] + ["1001", "--output", str(bad)]))
    (tmp_path / "emb.ids.txt").write_text("".join(f"doc{i % 999}\n" for i in range(len(corpus))))
    with pytest.raises(ValueError, match=r"the id 'doc0' twice \(rows 0 and 999\)"):
        command.run(parse(args[:-2] + ["--output", str(bad)]))
    assert not bad.exists() and not list(tmp_path.glob("*.tmp"))
    # An output naming an input is refused, --overwrite or not, and the input is left as it was.
    queries_bytes = (tmp_path / "q.npy").read_bytes()
    with pytest.raises(ValueError, match=r"is the input file \(--queries "):
        command.run(parse(args[:4] + ["--output", str(tmp_path / "q.npy"), "--overwrite"]))
    assert (tmp_path / "q.npy").read_bytes() == queries_bytes


def test_command_encodes_jsonl_queries(relu_instructor, relu_reference, tmp_path):
    texts = ["a small dog follows the river", "heavy rain in the city", "the bank raised its rates", "a cat"]
    instruction = "Represent the sentence for retrieval: "
    corpus = relu_instructor.encode(texts, instruction=instruction)
    emb = write_corpus(tmp_path, corpus, ids=False)
    queries_path = tmp_path / "q.jsonl"
    queries_path.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "results.jsonl"
    command.run(parse(["--model", str(relu_reference[0]), "--corpus", str(emb), "--queries", str(queries_path),
                       "--instruction", instruction, "--k", "4", "--output", str(out)]))
    rows = read_results(out)
    expected, _ = brute_force(corpus, corpus, 4)
    assert [r["query_id"] for r in rows] == ["q0", "q1", "q2", "q3"]
    assert [r["ids"] for r in rows] == expected.tolist() and [r["ids"][0] for r in rows] == [0, 1, 2, 3]


DRIVER = textwrap.dedent("""
    import sys
    from instructor_jax.search import command
    import argparse
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args(sys.argv[1:])
    command.run(args)
    import jax
    print("driver done", jax.process_index(), jax.device_count(), flush=True)
""")


def test_two_processes_give_what_one_gives(data, tmp_path):
    corpus, queries_, ids, scores = data
    emb = write_corpus(tmp_path, corpus)
    np.save(tmp_path / "q.npy", queries_)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    coordinator = f"127.0.0.1:{free_port()}"
    base = [sys.executable, str(script), "--corpus", str(emb), "--queries", str(tmp_path / "q.npy"), "--k", str(K),
            "--batch_size", "16", "--output", str(tmp_path / "two.jsonl"), "--coordinator_address", coordinator,
            "--num_processes", "2", "--process_id"]
    children = [subprocess.Popen(base + [str(i)], env=child_env(2), cwd=REPO, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=180)[0] for p in children]
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in children] == [0, 0], "\n----\n".join(outputs)
    assert "driver done 1 4" in outputs[1]
    rows = read_results(tmp_path / "two.jsonl")
    assert [r["ids"] for r in rows] == [[f"doc{i}" for i in row] for row in ids.tolist()]
    np.testing.assert_allclose([r["scores"] for r in rows], scores, atol=1e-5)
    one = search(corpus, queries_, K)
    assert [r["ids"] for r in rows] == [[f"doc{i}" for i in row] for row in one.indices.tolist()]
