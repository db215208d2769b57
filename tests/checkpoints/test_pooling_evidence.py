"""The pooling rule comes from evidence: INSTRUCTOR checkpoints laid out as users really have them.

The hkunlp repositories carry no `include_prompt` and their files do not say "INSTRUCTOR"; a download
lands in `models--hkunlp--instructor-large/snapshots/<commit>/` (links into `../../blobs/`) or in a folder
the user names. Each must pool as InstructorEmbedding 1.0.1 does, computed by sentence-transformers.
"""

import json
import logging
import shutil

import numpy as np
import pytest

from instructor_jax import Instructor
from instructor_jax.checkpoints import convert
from instructor_jax.cli import main as cli
from instructor_jax.model.config import tiny_config
from instructor_jax.checkpoints.pooling_evidence import decide_pooling_rule, hub_ids_in_path
from instructor_jax.reference import (instructor_embedding_reference, lay_out_as_hub_cache,
                                      make_reference_checkpoint, rewrite_as_hkunlp_layout)
from instructor_jax.model.tokenization import join_instruction

MULTI_PIECE = ["Represent the Wikipedia question for retrieving supporting documents: ",
               "Represent the scientific abstract for clustering: "]
INSTRUCTIONS = MULTI_PIECE + ["", "x"]  # no instruction, and a one-piece one (the n <= 1 rule)
TEXTS = ["where is the food stored in a yam plant", "the old bridge measures heavy rain. " * 12, "x"]
PAIRS = [[i, t] for i in INSTRUCTIONS for t in TEXTS]

INSTRUCTOR_CARD = """---
pipeline_tag: sentence-similarity
tags:
- text-embedding
- sentence-transformers
language: en
license: apache-2.0
model-index:
- name: INSTRUCTOR
  results: []
---

# hkunlp/instructor-large
We introduce **Instructor**, an instruction-finetuned text embedding model.
"""
GTR_CARD = """---
pipeline_tag: sentence-similarity
language: en
license: apache-2.0
tags:
- sentence-transformers
- feature-extraction
---

# sentence-transformers/gtr-t5-large

This is a sentence-transformers model; it was converted from the TensorFlow model gtr-large-1.
"""


@pytest.fixture(scope="module")
def hkunlp(tmp_path_factory):
    """(plain hkunlp-layout directory, the sentence-transformers model with include_prompt=False)."""
    directory = tmp_path_factory.mktemp("made") / "checkpoint"
    config = tiny_config("relu", num_layers=2, num_heads=4)
    reference = make_reference_checkpoint(directory, config, seed=11)
    rewrite_as_hkunlp_layout(directory, max_seq_length=config.max_seq_length)
    assert "include_prompt" not in json.loads((directory / "1_Pooling/config.json").read_text())
    return directory, reference


@pytest.fixture(scope="module")
def user_layouts(hkunlp, tmp_path_factory):
    """The same INSTRUCTOR checkpoint where users have it; no folder name says 'instructor'."""
    source, _ = hkunlp
    root = tmp_path_factory.mktemp("users")
    snapshot = lay_out_as_hub_cache(source, root / "hub", "hkunlp/instructor-large")
    assert (snapshot / "modules.json").is_symlink() and (snapshot / "1_Pooling/config.json").is_symlink()
    plain = root / "models" / "large"
    shutil.copytree(source, plain)
    carded = root / "models" / "copy"
    shutil.copytree(source, carded)
    (carded / "README.md").write_text(INSTRUCTOR_CARD)
    return {"hub cache": snapshot, "plain folder": plain, "model card": carded}


EXPECTED_REASONS = {"hub cache": "hub id in the path", "plain folder": "applies INSTRUCTOR's pooling to any",
                    "model card": "model card"}


@pytest.mark.parametrize("layout", ["hub cache", "plain folder", "model card"])
def test_instructor_checkpoints_pool_as_instructor_embedding_wherever_they_live(hkunlp, user_layouts, layout,
                                                                              caplog):
    _, reference = hkunlp
    with caplog.at_level(logging.INFO, logger="instructor_jax.checkpoints.pooling_evidence"):
        model = Instructor.from_pretrained(user_layouts[layout])
    assert model.config.pooling_rule == "instructor"
    lines = [r.getMessage() for r in caplog.records if r.name == "instructor_jax.checkpoints.pooling_evidence"]
    assert len(lines) == 1 and EXPECTED_REASONS[layout] in lines[0] and "--pooling_rule" in lines[0], lines
    expected = instructor_embedding_reference(reference, PAIRS)
    assert np.abs(model.encode(PAIRS) - expected).max() < 1e-5


def _gtr_reference(reference, pairs):
    """GTR pools every token: the joined string with no prompt."""
    return reference.encode([join_instruction(i, t) for i, t in pairs], show_progress_bar=False)


def test_gtr_named_by_its_hub_cache_path_or_card_pools_the_instruction_too(hkunlp, tmp_path):
    source, reference = hkunlp
    snapshot = lay_out_as_hub_cache(source, tmp_path / "hub", "sentence-transformers/gtr-t5-large")
    carded = tmp_path / "models" / "base"
    shutil.copytree(source, carded)
    (carded / "README.md").write_text(GTR_CARD)
    expected = _gtr_reference(reference, PAIRS)
    for directory in (snapshot, carded):
        model = Instructor.from_pretrained(directory)
        assert model.config.pooling_rule == "none", directory
        assert np.abs(model.encode(PAIRS) - expected).max() < 1e-5


def test_a_hub_id_given_is_evidence(hkunlp, tmp_path, monkeypatch):
    """What `snapshot_download` returns is a commit-hash folder; the id asked for names the model."""
    import huggingface_hub

    plain = tmp_path / "0123abcd"
    shutil.copytree(hkunlp[0], plain)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(plain))
    assert Instructor.from_pretrained("sentence-transformers/gtr-t5-base").config.pooling_rule == "none"
    assert Instructor.from_pretrained("hkunlp/instructor-xl").config.pooling_rule == "instructor"
    # convert takes a hub id too, and its output records the rule the id implied.
    convert.convert("sentence-transformers/gtr-t5-base", tmp_path / "gtr-jax")
    assert convert.read_any(tmp_path / "gtr-jax")[0].pooling_rule == "none"


@pytest.mark.parametrize("include_prompt, rule", [(True, "none"), (False, "sentence-transformers")])
def test_an_explicit_include_prompt_wins_over_identity(hkunlp, tmp_path, include_prompt, rule):
    source, _ = hkunlp
    edited = tmp_path / "edited"
    shutil.copytree(source, edited)
    pooling = json.loads((edited / "1_Pooling/config.json").read_text())
    (edited / "1_Pooling/config.json").write_text(json.dumps({**pooling, "include_prompt": include_prompt}))
    snapshot = lay_out_as_hub_cache(edited, tmp_path / "hub", "hkunlp/instructor-large")
    assert convert.read_sentence_transformers(snapshot)[0].pooling_rule == rule
    assert convert.read_sentence_transformers(snapshot, pooling_rule="instructor")[0].pooling_rule == "instructor"


def test_our_recorded_rule_is_read_and_a_contradiction_is_an_error(hkunlp, tmp_path):
    source, _ = hkunlp
    convert.convert(source, tmp_path / "jax", pooling_rule="none")
    convert.convert(tmp_path / "jax", tmp_path / "pt")
    assert convert.read_sentence_transformers(tmp_path / "pt")[0].pooling_rule == "none"
    pooling_path = tmp_path / "pt/1_Pooling/config.json"
    assert json.loads(pooling_path.read_text())["include_prompt"] is True
    pooling_path.write_text(json.dumps({**json.loads(pooling_path.read_text()), "include_prompt": False}))
    with pytest.raises(ValueError, match="instructor_jax.json records pooling rule 'none'"):
        convert.read_sentence_transformers(tmp_path / "pt")


@pytest.mark.parametrize("layout", ["hub cache", "plain folder", "model card"])
def test_convert_both_ways_gives_an_export_plain_sentence_transformers_runs_right(hkunlp, user_layouts, layout,
                                                                                tmp_path, caplog):
    from sentence_transformers import SentenceTransformer

    _, reference = hkunlp
    with caplog.at_level(logging.INFO, logger="instructor_jax.checkpoints.pooling_evidence"):
        cli(["convert", str(user_layouts[layout]), str(tmp_path / "jax")])
    assert "pooling rule 'instructor'" in caplog.text
    cli(["convert", str(tmp_path / "jax"), str(tmp_path / "pt")])
    exported = SentenceTransformer(str(tmp_path / "pt"), device="cpu")
    assert exported[1].include_prompt is False
    pairs = [[i, t] for i in MULTI_PIECE for t in TEXTS]
    expected = instructor_embedding_reference(reference, pairs)
    for instruction in MULTI_PIECE:
        rows = [k for k, (i, _) in enumerate(pairs) if i == instruction]
        got = exported.encode(TEXTS, prompt=instruction, show_progress_bar=False)
        assert np.abs(got - expected[rows]).max() < 1e-5


def test_pooling_rule_flag_on_convert_and_encode(hkunlp, user_layouts, tmp_path):
    import subprocess
    import sys

    # A real process: the CLI shows the decision line without -v.
    result = subprocess.run([sys.executable, "-m", "instructor_jax.cli", "convert", str(user_layouts["hub cache"]),
                             str(tmp_path / "jax"), "--pooling_rule", "none"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "pooling rule 'none'" in result.stderr and "given as --pooling_rule" in result.stderr
    assert convert.read_any(tmp_path / "jax")[0].pooling_rule == "none"
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"instruction": i, "text": t}) + "\n" for i, t in PAIRS))
    cli(["encode", "--model", str(user_layouts["plain folder"]), "--input", str(corpus),
         "--output", str(tmp_path / "none.npy"), "--pooling_rule", "none", "--quiet"])
    expected = _gtr_reference(hkunlp[1], PAIRS)
    assert np.abs(np.load(tmp_path / "none.npy") - expected).max() < 1e-5


# --- the decision itself, on files alone ------------------------------------------------------------------

def test_every_path_component_is_read_as_given_and_as_resolved(tmp_path):
    snapshot = tmp_path / "models--hkunlp--instructor-base" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "link").symlink_to(snapshot)
    assert list(hub_ids_in_path(tmp_path / "link")) == ["hkunlp/instructor-base"]
    assert list(hub_ids_in_path(snapshot / "sub")) == ["hkunlp/instructor-base"]
    assert list(hub_ids_in_path(tmp_path / "plain")) == []


def test_lineage_counts_only_for_instructor(tmp_path):
    """A fine-tune of INSTRUCTOR keeps its pooling; INSTRUCTOR itself is a fine-tune of GTR."""
    card = "---\nbase_model: {}\n---\n\n# My embedder\n"
    (tmp_path / "README.md").write_text(card.format("hkunlp/instructor-large"))
    decision = decide_pooling_rule(tmp_path, {})
    assert decision.rule == "instructor" and "base_model" in decision.reason
    (tmp_path / "README.md").write_text(card.format("sentence-transformers/gtr-t5-large"))
    decision = decide_pooling_rule(tmp_path, {})
    assert decision.rule == "instructor" and "any directory" in decision.reason
    (tmp_path / "README.md").write_text("---\n: [broken yaml\n---\n# sentence-transformers/sentence-t5-base\n")
    assert decide_pooling_rule(tmp_path, {}).rule == "none"  # the title still names it


def test_config_name_counts_only_as_a_hub_id(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "sentence-transformers/gtr-t5-xl"}))
    assert decide_pooling_rule(tmp_path, {}).rule == "none"
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "/home/me/gtr-t5-xl"}))
    assert decide_pooling_rule(tmp_path, {}).rule == "instructor"


def test_bad_include_prompt_and_override_are_errors(tmp_path):
    with pytest.raises(ValueError, match="include_prompt is 'yes'"):
        decide_pooling_rule(tmp_path, {"include_prompt": "yes"})
    with pytest.raises(ValueError, match="pooling rule must be one of"):
        decide_pooling_rule(tmp_path, {}, override="mean")
