"""Evaluation: instruction tables, local tasks of every mteb type scored by the real mteb, parity with mteb's
own sentence-transformers wrapper on the exported model, `instructor-jax eval`, paraphrase robustness and
evaluation during training."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from instructor_jax.evaluation import instructions as ins

MTEB_PYTHON = sys.version_info >= (3, 11)
needs_mteb = pytest.mark.skipif(not MTEB_PYTHON, reason="mteb 2.x needs Python >= 3.11 (the mteb extra installs "
                                                        "nothing on older Pythons)")
SIZES = ["hkunlp/instructor-base", "hkunlp/instructor-large", "hkunlp/instructor-xl"]
TYPES = {"STS", "Retrieval", "Reranking", "Classification", "Clustering", "PairClassification", "Summarization"}


# ------------------------------------------------------------------------------------------------- tables
def test_reference_table_is_packaged_with_its_provenance():
    data = json.loads(ins.REFERENCE_TABLE.read_text())
    assert "xlang-ai/instructor-embedding" in data["_source"]
    assert all(len(data[size]) == 67 for size in SIZES)
    # The sizes differ (the reference tuned them separately).
    assert data["hkunlp/instructor-xl"] != data["hkunlp/instructor-large"]


def test_instruction_lookup(tmp_path):
    large = ins.load_instructions("hkunlp/instructor-large")
    assert ins.instruction_for(large, "ArguAna", "query") == large["ArguAna"]["query"]
    assert ins.instruction_for(large, "ArguAna", "document") == large["ArguAna"]["corpus"]
    assert ins.instruction_for(large, "BIOSSES", None) == large["BIOSSES"]
    # A user's table wins over a task's own; the task's own over the default.
    assert ins.instruction_for({"T": "mine: "}, "T", None, own="own: ") == "mine: "
    assert ins.instruction_for({}, "T", "document", own={"query": "q: ", "corpus": "c: "}) == "c: "
    assert ins.instruction_for({}, "T", None, default="") == ""
    with pytest.raises(ins.MissingInstruction, match=r"the task T\b.*--instructions.*--default_instruction"):
        ins.instruction_for({}, "T", None)
    # Files: {task: entry}, or tables by model name (FILE::NAME picks one of several).
    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps({"_source": "mine", "T": {"query": "q: ", "corpus": "c: "}}))
    assert ins.load_instructions(str(flat)) == {"T": {"query": "q: ", "corpus": "c: "}}
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps({"a/m1": {"T": "one: "}, "a/m2": {"T": "two: "}}))
    with pytest.raises(ValueError, match="::NAME"):
        ins.load_instructions(str(nested))
    assert ins.load_instructions(f"{nested}::a/m2") == {"T": "two: "}
    with pytest.raises(FileNotFoundError, match="instructor-base"):
        ins.load_instructions("hkunlp/instructor-huge")
    with pytest.raises(ValueError, match="instruction of T"):
        ins.load_instructions({"T": {"query": 3}})


@needs_mteb
def test_every_mteb_english_task_resolves_to_the_reference_instruction():
    """The 56 tasks of MTEB(eng, v1), from the installed mteb's own metadata (offline); CQADupstack is an
    aggregate whose sub-forums each have their entry."""
    import mteb

    from instructor_jax.evaluation.encoder import MTEBEncoder

    tasks = list(mteb.get_benchmark("MTEB(eng, v1)").tasks)
    assert len(tasks) == 56
    model = _FakeModel()
    for size in SIZES:
        table = ins.load_instructions(size)
        encoder = MTEBEncoder(model, size)
        encoder.check_tasks(tasks)  # raises on a task without instruction
        for task in tasks:
            for sub in getattr(task, "tasks", None) or [task]:
                entry = table[sub.metadata.name]
                query = entry if isinstance(entry, str) else entry["query"]
                document = entry if isinstance(entry, str) else entry["corpus"]
                assert encoder.instruction(sub.metadata, mteb.types.PromptType.query) == query
                assert encoder.instruction(sub.metadata, mteb.types.PromptType.document) == document
                assert query.strip() and document.strip()
    with pytest.raises(ins.MissingInstruction, match="STS12"):
        MTEBEncoder(model, {}).check_tasks([mteb.get_task("STS12")])


class _FakeModel:
    """What MTEBEncoder reads of an Instructor before encoding."""
    dim = 8
    source = None

    class config:
        max_seq_length = 32


# ------------------------------------------------------------------------------------------------- tasks
@needs_mteb
def test_bundled_tasks_cover_every_type_and_load_as_mteb_tasks():
    from mteb.abstasks.abstask import AbsTask

    from instructor_jax.evaluation import load_tasks

    tasks = load_tasks(None)
    assert {t.metadata.type for t in tasks} == TYPES
    for task in tasks:
        assert isinstance(task, AbsTask)
        task.load_data()
        assert task.data_loaded
    paraphrases = json.loads(ins.BUNDLED_PARAPHRASES.read_text())
    assert all(len(paraphrases[t.metadata.name]) == 5 for t in tasks)


def test_bad_local_task_is_named(tmp_path):
    from instructor_jax.evaluation.tasks import read_task_json

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "task.json").write_text(json.dumps({"name": "X", "type": "Retrieval"}))
    with pytest.raises(FileNotFoundError, match=r"Retrieval task needs \['queries.jsonl'"):
        read_task_json(tmp_path / "t")
    (tmp_path / "t" / "task.json").write_text(json.dumps({"name": "X", "type": "Bitext"}))
    with pytest.raises(ValueError, match="Bitext"):
        read_task_json(tmp_path / "t")


# ------------------------------------------------------------------------------------------------- parity
PARITY_SCRIPT = textwrap.dedent("""
    import json, sys
    import mteb
    from instructor_jax.evaluation import load_tasks
    from instructor_jax.evaluation.run import run_tasks

    side, model_dir, prompts = sys.argv[1:4]
    tasks = load_tasks(None)
    if side == "jax":
        from instructor_jax import Instructor
        from instructor_jax.evaluation import MTEBEncoder

        scores = run_tasks(MTEBEncoder(Instructor.from_pretrained(model_dir)), tasks)
    else:  # no JAX in this process: mteb's own wrapper of sentence-transformers
        from sentence_transformers import SentenceTransformer
        from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

        wrapper = SentenceTransformerEncoderWrapper(SentenceTransformer(model_dir, device="cpu"))
        # mteb checks prompt keys against its own task registry, which local tasks are not in: set them
        # after construction; the lookup (Task-query, Task-document, Task) stays mteb's own.
        wrapper.model_prompts = json.loads(open(prompts).read())
        result = mteb.evaluate(wrapper, tasks, cache=None, overwrite_strategy="always", show_progress_bar=False,
                               encode_kwargs={"batch_size": 32})
        scores = {r.task_name: float(r.get_score()) for r in result.task_results}
    print("SCORES " + json.dumps(scores))
""")


@needs_mteb
def test_main_scores_equal_mteb_on_the_exported_sentence_transformers_model(tmp_path, relu_instructor):
    """Every task type: our MTEBEncoder vs mteb's SentenceTransformerEncoderWrapper on the export, with the
    same instructions as its prompts. Each side runs in a fresh process: classification and clustering
    draw from random state that persists across mteb.evaluate calls in one process."""
    from instructor_jax.evaluation import MTEBEncoder, load_tasks
    from instructor_jax.evaluation.encoder import instructions_as_prompts

    relu_instructor.save_pretrained(tmp_path / "jax")
    relu_instructor.export_sentence_transformers(tmp_path / "st")
    prompts = instructions_as_prompts(MTEBEncoder(relu_instructor), load_tasks(None))
    assert prompts["TinySubjectRetrieval-query"] and prompts["TinyActionSTS"]
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    runs = {side: subprocess.Popen([sys.executable, str(script), side, str(tmp_path / side), str(tmp_path / "prompts.json")],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for side in ("jax", "st")}
    scores = {}
    for side, process in runs.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-3000:]
        scores[side] = json.loads(next(l for l in out.splitlines() if l.startswith("SCORES "))[7:])
    assert set(scores["jax"]) == set(scores["st"]) and len(scores["jax"]) == len(TYPES)
    for task, score in scores["jax"].items():
        assert abs(score - scores["st"][task]) <= 1e-4, (task, score, scores["st"][task])


# ------------------------------------------------------------------------------------------------- CLI
STS_TASK = ins.BUNDLED_TASKS / "TinyActionSTS"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, relu_instructor):
    directory = tmp_path_factory.mktemp("eval") / "model"
    relu_instructor.save_pretrained(directory)
    return directory


@needs_mteb
def test_cli_eval_writes_results_summary_and_compares(tmp_path, model_dir, capsys):
    from instructor_jax.cli import main

    main(["eval", "--model", str(model_dir), "--output", str(tmp_path / "with"), "--compare", "hkunlp/instructor-large"])
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "with" / "summary.json").read_text())
    assert set(summary["categories"]) == TYPES - {"Reranking"} | {"Reranking"} and len(summary["tasks"]) == 7
    assert "| model | avg | class | clust | pair | rerank | retr | STS | summ |" in (tmp_path / "with" / "summary.md").read_text()
    results = list((tmp_path / "with" / "results").glob("*/*/*.json"))  # mteb's layout: MODEL/REVISION/TASK.json
    assert {p.stem for p in results} >= set(summary["tasks"])
    assert "hkunlp/instructor-large (MTEB leaderboard)" in out and "| average |" in out
    # The recorded instructions are the tasks' own; --no_instructions uses none, and compares per task.
    assert summary["instructions"]["TinySubjectRetrieval-query"].startswith("Represent the news sentence")
    main(["eval", "--model", str(model_dir), "--tasks", str(STS_TASK), "--output", str(tmp_path / "without"),
          "--no_instructions", "--compare", str(tmp_path / "with")])
    out = capsys.readouterr().out
    assert "| TinyActionSTS |" in out.split("compared with")[1]
    # The columns say which results each is, though both runs are of the same model directory.
    assert f"(no instructions) ({tmp_path / 'without'}) | " in out and f"({tmp_path / 'with'}) | difference |" in out
    assert json.loads((tmp_path / "without" / "summary.json").read_text())["instructions"] == {"TinyActionSTS": ""}


@needs_mteb
def test_cli_eval_errors_name_the_fix(tmp_path, model_dir, capsys):
    from instructor_jax.cli import main

    bare = tmp_path / "Bare"
    bare.mkdir()
    (bare / "task.json").write_text(json.dumps({"name": "BareSTS", "type": "STS"}))
    (bare / "test.jsonl").write_text(json.dumps({"sentence1": "A b.", "sentence2": "C d.", "score": 1}) + "\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(model_dir), "--tasks", str(bare), "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "no instruction for the task BareSTS" in capsys.readouterr().err
    # MTEB's own tasks need the hub, which tests never reach (HF_HUB_OFFLINE=1): said in one line.
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(model_dir), "--tasks", "STS12", "--instructions", "hkunlp/instructor-base",
              "--output", str(tmp_path / "o")])
    assert e.value.code == 2
    assert "needs its data from the Hugging Face hub" in capsys.readouterr().err


@needs_mteb
def test_cli_eval_paraphrases_reports_the_spread(tmp_path, model_dir, capsys):
    from instructor_jax.cli import main

    paraphrases = json.loads(ins.BUNDLED_PARAPHRASES.read_text())
    small = tmp_path / "paraphrases.json"
    small.write_text(json.dumps({"TinyActionSTS": paraphrases["TinyActionSTS"][:3]}))
    main(["eval", "--model", str(model_dir), "--tasks", str(STS_TASK), "--output", str(tmp_path / "p"),
          "--paraphrases", str(small)])
    report = json.loads((tmp_path / "p" / "robustness.json").read_text())["TinyActionSTS"]
    assert len(report["scores"]) == 3 and report["best"] >= report["worst"]
    assert report["spread"] == pytest.approx(report["best"] - report["worst"]) and report["std"] >= 0
    assert len(set(report["scores"])) > 1  # the wording changes the embeddings
    assert "| TinyActionSTS | 3 |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- training
@needs_mteb
def test_training_logs_eval_task_scores_at_its_evaluation_steps(tmp_path):
    from tests.train.test_loop import small

    from instructor_jax.train.loop import train

    train(tmp_path, small(total_steps=2, eval_every=1, eval_tasks=(str(STS_TASK),), held_out_file=None))
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["eval/TinyActionSTS"] for r in rows if "eval/TinyActionSTS" in r}
    assert sorted(logged) == [0, 1, 2]  # before, every eval_every, and at the end
    assert all(-1 <= v <= 1 for v in logged.values()) and len(set(logged.values())) > 1


def test_eval_tasks_are_checked_before_any_compute(tmp_path):
    from instructor_jax.train.config import TrainConfig

    with pytest.raises(FileNotFoundError, match="holds no local task"):
        TrainConfig(eval_tasks=(str(tmp_path),)).validate()
    (tmp_path / "task.json").write_text(json.dumps({"name": "X", "type": "STS"}))
    (tmp_path / "test.jsonl").write_text("{}\n")
    with pytest.raises(ValueError, match="no \"instruction\""):
        TrainConfig(eval_tasks=(str(tmp_path),)).validate()


def test_a_multi_process_run_evaluates_on_process_zero_only(monkeypatch, relu_instructor):
    """Every process gathers the parameters (a collective); process 0 alone runs mteb."""
    import jax

    from instructor_jax.evaluation import run, training

    calls = []
    monkeypatch.setattr(run, "run_tasks", lambda encoder, tasks, *a: calls.append(jax.process_index()) or {"T": 0.5})
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    m = relu_instructor
    evaluate = training.make_task_evaluator([str(STS_TASK)], m.config, m.tokenizer.tokenizer, None, None)
    if MTEB_PYTHON:
        monkeypatch.setattr(jax, "process_index", lambda: 1)
        assert evaluate(m.params) is None and calls == []
        monkeypatch.setattr(jax, "process_index", lambda: 0)
        assert evaluate(m.params) == {"T": 0.5} and calls == [0]


# ------------------------------------------------------------------------------------------------- issue 25: misuse
def _copy_task(tmp_path, name="TinyActionSTS", **changes):
    import shutil

    directory = tmp_path / "tasks" / "t"
    shutil.copytree(STS_TASK, directory)
    spec = json.loads((directory / "task.json").read_text())
    spec.update(name=name, **changes)
    (directory / "task.json").write_text(json.dumps(spec))
    return directory


@pytest.mark.fast
@pytest.mark.parametrize("name", ["../../victim", "a/b", "..", ".hidden", "a\\b", "tab\there"])
def test_a_task_name_holding_a_path_is_refused_before_anything_is_written(tmp_path, capsys, name):
    from instructor_jax.cli import main

    task = _copy_task(tmp_path, name)
    victim = tmp_path / "victim.json"  # where mteb would write "../../victim"'s results for --output tmp/out/sub
    victim.write_bytes(b"precious\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", str(task), "--output",
              str(tmp_path / "out" / "sub")])
    assert e.value.code == 2 and "is not a plain file name" in capsys.readouterr().err
    assert victim.read_bytes() == b"precious\n" and not (tmp_path / "out").exists()


@pytest.mark.fast
@pytest.mark.parametrize("task_json, rows, message", [
    ("{not json", None, r"task.json: not JSON \(Expecting property name"),
    ("[1, 2]", None, "task.json: needs a JSON object with 'name' and 'type', got a list"),
    (None, ['{"sentence1": "a", "sentence2": "b", "score": 1}', "[1, 2]"], r"test.jsonl, line 2: needs a JSON object"),
    (None, ['{"sentence1": "a", "sentence2": "b", "score": 1}', "7"], r"test.jsonl, line 2: needs a JSON object"),
    (None, ['{"sentence1": "a", "sentence2": "b", "score": "4.5"}'], r"test.jsonl, line 1: 'score' must be a number"),
    (None, ['{"sentence1": 3, "sentence2": "b", "score": 1}'], r"test.jsonl, line 1: 'sentence1' must be a string"),
])
def test_malformed_local_task_files_name_the_file_and_line(tmp_path, task_json, rows, message):
    from instructor_jax.evaluation.tasks import read_jsonl, read_task_json

    task = _copy_task(tmp_path)
    if task_json is not None:
        (task / "task.json").write_text(task_json)
        with pytest.raises(ValueError, match=message):
            read_task_json(task)
    else:
        (task / "test.jsonl").write_text("\n".join(rows) + "\n")
        with pytest.raises(ValueError, match=message):
            read_jsonl(task / "test.jsonl", ["sentence1", "sentence2", "score"])


@pytest.mark.fast
@pytest.mark.parametrize("content, message", [
    ("", r"--paraphrases \S+p.json: not JSON"),
    ('["Represent the sentence: "]', r"--paraphrases \S+p.json: must be a JSON object .* got a list"),
])
def test_a_bad_paraphrase_file_is_named_before_the_model_loads(tmp_path, capsys, content, message):
    import re

    from instructor_jax.cli import main

    (tmp_path / "p.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", str(STS_TASK), "--output",
              str(tmp_path / "out"), "--paraphrases", str(tmp_path / "p.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err), err


@pytest.mark.fast
def test_compare_over_different_task_sets_says_so_and_averages_the_shared_tasks():
    from instructor_jax.evaluation.run import compare

    def summary(scores):
        tasks = {name: {"type": kind, "main_score": "x", "score": score} for name, (kind, score) in scores.items()}
        categories = {}
        for name, (kind, score) in scores.items():
            categories.setdefault(kind, []).append(score)
        return {"model": "m", "tasks": tasks, "categories": {k: sum(v) / len(v) for k, v in categories.items()},
                "average": sum(s for _, s in scores.values()) / len(scores)}

    here = summary({"A": ("STS", 50.0), "B": ("STS", 70.0)})
    there = summary({"A": ("STS", 40.0), "C": ("Retrieval", 10.0)})
    out = compare(here, there)
    assert "| average | 50.00 | 40.00 | +10.00 |" in out  # over A alone, not 60 vs 25
    assert "| STS (category) | 50.00 | 40.00 | +10.00 |" in out
    assert "share 1 task(s) (only in this run: ['B']; only in the reference: ['C'])" in out
    assert "note" not in compare(here, here)
    leaderboard = {"model": "board", "average": 61.0, "categories": {"STS": 80.0}, "tasks": {}}
    assert "compare different task sets" in compare(here, leaderboard)


@needs_mteb
def test_an_instruction_for_no_task_run_is_warned_of(tmp_path, caplog):
    import logging

    from instructor_jax.cli import main

    (tmp_path / "ins.json").write_text(json.dumps({"TinyActionSTS": "Represent: ", "TinyActoinSTS": "typo: "}))
    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        main(["eval", "--model", str(tmp_path / "never-loaded"), "--tasks", str(STS_TASK), "--output",
              str(tmp_path / "out"), "--instructions", str(tmp_path / "ins.json")])
    assert any("no task run is named TinyActoinSTS" in r.getMessage() for r in caplog.records)
