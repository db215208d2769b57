"""The package's layout (issue 21): its rules hold, the public surface stayed, and what 0.1 wrote still loads.

`tests/fixtures/workdir_0.1` is a workdir written by the code before the move into subpackages (commit
f5eeb68: `instructor-jax train --gin_file configs/tiny.gin` with the bindings below, stopped after its
checkpoint at step 2), with its instructor-jax and sentence-transformers exports.
"""

import importlib.util
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "workdir_0.1"
BINDINGS = ("TrainConfig.total_steps = 4", "TrainConfig.warmup_steps = 1", "TrainConfig.eval_every = 2",
            "TrainConfig.save_every = 2")


def _check_layout():
    spec = importlib.util.spec_from_file_location("check_layout", REPO / "tools" / "check_layout.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.fast
def test_the_package_keeps_its_layout_rules():
    findings = _check_layout().check(REPO)
    assert findings == {rule: [] for rule in findings}


@pytest.mark.fast
def test_the_layout_check_finds_what_it_forbids(tmp_path):
    # A cycle, a private name, a layer pointing up, a long function: each is reported.
    package = tmp_path / "instructor_jax"
    for sub in ("runtime", "model"):
        (package / sub).mkdir(parents=True)
        (package / sub / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "runtime" / "a.py").write_text("from instructor_jax.runtime import b\n")
    (package / "runtime" / "b.py").write_text("from instructor_jax.runtime.a import _hidden\n")
    (package / "runtime" / "c.py").write_text("from instructor_jax.model import d\n")
    (package / "model" / "d.py").write_text("def f():\n" + "    x = 1\n" * 130)
    findings = _check_layout().check(tmp_path)
    assert findings["cycles"] == [["instructor_jax.runtime.a", "instructor_jax.runtime.b"]]
    assert findings["private names"] == ["instructor_jax.runtime.b:1 imports instructor_jax.runtime.a._hidden"]
    assert findings["layers"] == ["instructor_jax.runtime.c:1 imports instructor_jax.model.d (a higher layer)"]
    assert findings["long functions"] == ["instructor_jax.model.d.f: 131 lines"]


@pytest.mark.fast
def test_the_public_surface_stays():
    import instructor_jax
    import instructor_jax.corpus
    import instructor_jax.distributed
    from instructor_jax import EncoderConfig, HeadConfig, Instructor, InstructorConfig, open_embeddings  # noqa: F401
    from instructor_jax.encode.embedding_store import open_embeddings as owner
    from instructor_jax.runtime.distributed import initialize

    assert open_embeddings is owner is instructor_jax.corpus.open_embeddings  # 0.1's README named that path
    assert instructor_jax.distributed.initialize is initialize
    assert Instructor.__module__ == "instructor_jax.instructor"


@pytest.mark.fast
def test_help_lists_every_subcommand():
    result = subprocess.run([sys.executable, "-m", "instructor_jax.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("train", "encode", "convert", "data", "eval", "plot", "demo", "serve", "search"):
        assert command in result.stdout


def test_an_export_written_before_the_move_loads_and_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from instructor_jax import Instructor
    from instructor_jax.reference import reference_embeddings

    pairs = [["Represent the sentence for retrieval: ", "a small dog follows the river"], ["", "heavy rain"]]
    ours = Instructor.from_pretrained(FIXTURE / "model").encode(pairs)
    reference = reference_embeddings(SentenceTransformer(str(FIXTURE / "sentence_transformers"), device="cpu"), pairs)
    assert np.abs(ours - reference).max() < 1e-5


def test_a_workdir_written_before_the_move_resumes_exactly(tmp_path):
    from instructor_jax.cli import main as cli

    workdir = tmp_path / "run"
    shutil.copytree(FIXTURE, workdir)
    args = ["train", "--gin_file", str(REPO / "configs" / "tiny.gin"), "--workdir", str(workdir)]
    for binding in BINDINGS:
        args += ["--gin_bindings", binding]
    cli(args)  # raises on failure
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (REPO / "tests" / "fixtures" / "workdir_0.1.expected_after_resume.jsonl")
                .read_text().splitlines()]
    resumed = [r for r in rows if "loss" in r]
    assert [r["step"] for r in resumed] == [4] and abs(resumed[0]["loss"] - expected[0]["loss"]) < 1e-5  # the pre-move run's own step-4 loss
    # A resumed run scores the held-out set again at the step it resumes from, then at the end.
    assert [r["step"] for r in rows if "held_out_accuracy" in r] == [0, 2, 2, 4]
    assert abs(rows[-1]["held_out_accuracy"] - expected[1]["held_out_accuracy"]) < 1e-6
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]
