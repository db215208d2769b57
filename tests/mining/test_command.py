"""`data mine` end to end: MEDI that read_medi, the trainer and build-tfds take; the held-out task; bad input."""

import argparse
import contextlib
import io
import json
import pathlib

import pytest

from instructor_jax.mining import command

SAMPLE = pathlib.Path(__file__).parents[2] / "instructor_jax" / "assets" / "medi_sample" / "train.jsonl"


def parse(argv):
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    return parser.parse_args(argv)


def write_pairs(path, per_task=30):
    """Pairs of two tasks of the bundled sample, each line with its own instructions (as MEDI has them)."""
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    lines = []
    for task in ("question", "same_subject"):
        for r in [r for r in rows if r["task_name"] == task][:per_task]:
            lines.append({"query": r["query"][1], "positive": r["pos"][1], "task": task,
                          "query_instruction": r["query"][0], "document_instruction": r["pos"][0]})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


@pytest.fixture(scope="module")
def mined(relu_reference, tmp_path_factory):
    directory = tmp_path_factory.mktemp("mined")
    write_pairs(directory / "pairs.jsonl")
    output = directory / "medi.jsonl"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        command.run(parse(["--model", str(relu_reference[0]), "--input", str(directory / "pairs.jsonl"), "--output",
                           str(output), "--num_negatives", "2", "--holdout", "0.2", "--write_eval_task",
                           str(directory / "eval"), "--histogram"]))
    (directory / "stdout.txt").write_text(printed.getvalue())
    return directory, output


def test_medi_reads_with_the_trainers_reader_and_the_report(mined):
    from instructor_jax.train.medi import read_medi

    directory, output = mined
    examples = read_medi(output)
    report = json.loads((directory / "medi.report.json").read_text())
    assert len(examples) == report["rows_out"] > 60
    assert {e.task for e in examples} == {"question", "same_subject"}
    assert all(len(e.negs) == 1 and e.negs[0][1] not in (e.query[1], e.pos[1]) for e in examples)
    assert report["rows_in"] == 48 and report["queries"] == 48  # 12 of 60 queries held out
    assert set(report["holdout"]["recall"]) == {"question", "same_subject"}
    assert report["positive_scores"]["count"] == 48 and "relative_margin" in report["removed"]
    assert not list(directory.glob("*.tmp"))
    # Every text (kept and held-out queries, their documents) embedded once, up front, none late.
    assert report["embedded"]["encoded"] == report["embedded"]["texts"] > 60
    assert report["embedded"]["encoded_late"] == 0 and report["embedded"]["reused"] == 0
    histogram = directory / "medi.report.png"
    assert histogram.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and histogram.stat().st_size > 5000
    assert "medi.report.png" in directory.joinpath("stdout.txt").read_text()


def test_held_out_pairs_are_a_local_retrieval_task(mined):
    from instructor_jax.evaluation.tasks import read_task_json, task_directories

    directory, output = mined
    tasks = task_directories(directory / "eval")
    assert [t.name for t in tasks] == ["question", "same_subject"]
    spec = read_task_json(tasks[0])
    assert spec["type"] == "Retrieval" and spec["instruction"]["query"].startswith("Represent the Wikipedia question")
    trained = {e["query"][1] for e in map(json.loads, output.read_text().splitlines())}
    held_out = 0
    for task in tasks:
        queries = [json.loads(q) for q in (task / "queries.jsonl").read_text().splitlines()]
        qrels = [json.loads(line) for line in (task / "qrels.jsonl").read_text().splitlines()]
        documents = {json.loads(d)["id"] for d in (task / "corpus.jsonl").read_text().splitlines()}
        assert len(queries) == len(qrels) and {r["doc_id"] for r in qrels} <= documents
        assert not {q["text"] for q in queries} & trained
        held_out += len(queries)
    assert held_out == 12


def test_mining_again_with_other_filters_reuses_the_embeddings(mined, relu_reference, tmp_path):
    directory, _ = mined
    output = tmp_path / "again.jsonl"
    command.run(parse(["--model", str(relu_reference[0]), "--input", str(directory / "pairs.jsonl"), "--output",
                       str(output), "--num_negatives", "1", "--holdout", "0.2", "--work_dir",
                       str(directory / "medi.jsonl.work"), "--resume"]))
    report = json.loads((tmp_path / "again.report.json").read_text())
    assert report["embedded"]["encoded"] == 0 and report["embedded"]["reused"] == report["embedded"]["texts"]
    assert report["rows_out"] == report["pairs"] - report["without_negative"]  # one negative each


def test_an_interrupted_run_says_how_to_resume(relu_reference, tmp_path, monkeypatch):
    from instructor_jax.mining import embeddings
    from instructor_jax.runtime.interrupts import Interrupted

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(embeddings, "encode_items", interrupted)
    write_pairs(tmp_path / "pairs.jsonl", per_task=3)
    argv = ["--model", str(relu_reference[0]), "--input", str(tmp_path / "pairs.jsonl"), "--output",
            str(tmp_path / "medi.jsonl")]
    args = parse(argv)
    args.argv = ["data", "mine", *argv]
    with pytest.raises(Interrupted, match=r"kept in .*medi.jsonl.work\. To continue: instructor-jax data mine .* --resume"):
        command.run(args)
    assert not (tmp_path / "medi.jsonl").exists()


def test_mined_file_trains_and_builds_as_tfds(mined, tmp_path):
    from instructor_jax.train import tfds_medi
    from instructor_jax.train.data import open_examples
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.loop import train

    directory, output = mined
    count = len(output.read_text().splitlines())
    assert tfds_medi.build(output, tmp_path / "tfds") == count
    assert len(open_examples("tfds:medi", tfds_data_dir=str(tmp_path / "tfds"))) == count
    result = train(tmp_path / "run", TrainConfig(train_file=str(output), held_out_file=None, batch_size=8,
                                                 max_seq_length=32, total_steps=2, warmup_steps=1, save_every=2,
                                                 log_every=1, eval_every=1000, peak_flops_per_device=1e11,
                                                 export=False))
    assert result["step"] == 2


BAD = [
    ('{"query": "a", "positive": "b"}\n{"query": "c"}\n', [], r"pairs.jsonl, line 2: no positive"),
    ('{"query": "a", "positive": []}\n', [], r"line 1: no positive"),
    ('{"query": "a", "positive": "b"}\n', ["--relative_margin", "1.5"], r"--relative_margin must be in \[0, 1\)"),
    ('{"query": "a", "positive": "b"}\n', ["--absolute_margin", "-0.1"], r"--absolute_margin must be in"),
    ('{"query": "a", "positive": "b"}\n', ["--range_min", "5", "--range_max", "3"], r"--range_max \(3\) must be above"),
    ('{"query": "a", "positive": "b"}\n', ["--corpus", "EMPTY"], r"--corpus .*empty.txt is empty"),
    ('{"query": "a", "positive": "b"}\n', ["--corpus", "DUPLICATE"], r"docs.jsonl, line 3: the id 'x' was already used on line 1"),
    ('{"query": "a", "positive": "b"}\n', ["--holdout", "1.2"], r"--holdout must be a fraction"),
    ('{"query": "a", "positive": "b"}\n', ["--task", "t", "--query_instruction", None], r"line 1: no 'query_instruction'"),
    ('{"input": "a", "output": "b"}\n{"input": "c"}\n', ["--recipe", "outputs"], r"line 2: no 'output'"),
]


@pytest.mark.parametrize("text, flags, message", BAD, ids=[m.split(":")[-1].strip()[:30] for *_, m in BAD])
def test_bad_input_names_the_line_or_flag_and_writes_nothing(tmp_path, text, flags, message):
    (tmp_path / "pairs.jsonl").write_text(text)
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "docs.jsonl").write_text('{"id": "x", "text": "1"}\n{"id": "y", "text": "2"}\n{"id": "x", "text": "3"}\n')
    flags = [{"EMPTY": str(tmp_path / "empty.txt"), "DUPLICATE": str(tmp_path / "docs.jsonl")}.get(f, f) for f in flags]
    instruction = [] if None in flags else ["--query_instruction", "Represent the text: "]
    flags = [f for f in flags if f is not None][:-1] if None in flags else flags
    out = tmp_path / "medi.jsonl"
    with pytest.raises(ValueError, match=message):
        command.run(parse(["--model", "never-loaded", "--input", str(tmp_path / "pairs.jsonl"), "--output", str(out),
                           *instruction, *flags]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "empty.txt", "pairs.jsonl"]


@pytest.mark.fast
def test_an_output_naming_an_input_is_refused_even_with_overwrite(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"query": "a", "positive": "b"}\n')
    (tmp_path / "docs.jsonl").write_text('{"id": "x", "text": "1"}\n')
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for output, flag in ((pairs, "--input"), (tmp_path / "docs.jsonl", "--corpus")):
        with pytest.raises(ValueError, match=f"is the input file \\({flag} "):
            command.run(parse(["--model", "never-loaded", "--input", str(pairs), "--corpus", str(tmp_path / "docs.jsonl"),
                               "--output", str(output), "--overwrite", "--query_instruction", "Represent: "]))
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


DRIVER = """
import argparse, sys
from instructor_jax.mining import command
parser = argparse.ArgumentParser()
command.add_arguments(parser)
command.run(parser.parse_args(sys.argv[1:]))
print("driver done", flush=True)
"""


@pytest.mark.parametrize("filesystem", ["shared", "per_host"])
def test_two_processes_mine_what_one_mines(relu_reference, tmp_path, filesystem):
    """Each process encodes its share of the texts; the rows are read from the shards on a shared filesystem,
    and exchanged between the processes where each host sees only its own work directory."""
    import subprocess
    import sys

    from instructor_jax.encode import embedding_store
    from tests.runtime.test_distributed import REPO, child_env, free_port

    write_pairs(tmp_path / "pairs.jsonl", per_task=12)
    common = ["--model", str(relu_reference[0]), "--input", str(tmp_path / "pairs.jsonl"), "--num_negatives", "2"]
    command.run(parse(common + ["--output", str(tmp_path / "one.jsonl")]))
    (tmp_path / "driver.py").write_text(DRIVER)
    coordinator = f"127.0.0.1:{free_port()}"
    work = [tmp_path / ("two.jsonl.work" if filesystem == "shared" else f"host{i}") for i in range(2)]
    children = [subprocess.Popen([sys.executable, str(tmp_path / "driver.py"), *common, "--output",
                                  str(tmp_path / "two.jsonl"), "--work_dir", str(work[i]),
                                  "--coordinator_address", coordinator,
                                  "--num_processes", "2", "--process_id", str(i)], env=child_env(2), cwd=REPO,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=240)[0] for p in children]
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in children] == [0, 0], "\n----\n".join(outputs)
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()
    manifest = embedding_store.read_manifest(embedding_store.manifest_path(work[0] / "embeddings.npy"))
    texts = json.loads((tmp_path / "two.report.json").read_text())["embedded"]["texts"]
    assert [s["rows"] > 0 for s in manifest["shards"]] == [True, True] and manifest["rows"] == texts
    assert len(list(work[0].glob("embeddings-*-of-*.npy"))) == (2 if filesystem == "shared" else 1)
