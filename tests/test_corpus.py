"""`instructor-jax encode`: streamed corpus encoding, bad lines, atomic output, resume."""

import json
import logging

import numpy as np
import pytest

from instructor_jax.cli import main as cli
from instructor_jax.corpus import CorpusError, encode_corpus

INSTRUCTION = "Represent the sentence: "


def _write_jsonl(path, n, long_every=0):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        words = 60 if long_every and i % long_every == 0 else int(rng.integers(0, 12))
        rows.append({"id": f"doc-{i}", "instruction": INSTRUCTION, "text": "a small dog " * words})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_jsonl_with_ids_matches_the_api(relu_instructor, tmp_path, caplog):
    rows = _write_jsonl(tmp_path / "in.jsonl", 45, long_every=10)
    with caplog.at_level(logging.WARNING):
        progress = encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy",
                                 ids_path=tmp_path / "ids.txt", chunk_size=16, batch_size=8, show_progress_bar=False)
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (45, relu_instructor.dim) and progress.rows_done == 45
    np.testing.assert_allclose(out, relu_instructor.encode([[r["instruction"], r["text"]] for r in rows]), atol=1e-6)
    assert (tmp_path / "ids.txt").read_text().split() == [r["id"] for r in rows]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "in.jsonl", "out.npy"]
    expected = relu_instructor.tokenizer.tokenize([[r["instruction"], r["text"]] for r in rows]).num_truncated
    assert expected >= 5  # every 10th text is far too long
    truncation = [r.getMessage() for r in caplog.records if r.name == "instructor_jax.corpus"]
    assert truncation == [f"{expected} of 45 inputs were longer than max_seq_length=64 tokens and were truncated"]


def test_plain_text_needs_an_instruction(relu_instructor, tmp_path):
    (tmp_path / "in.txt").write_text("first text\n\nthird text\n")
    with pytest.raises(CorpusError, match="needs --instruction"):
        encode_corpus(relu_instructor, tmp_path / "in.txt", tmp_path / "out.npy", show_progress_bar=False)
    encode_corpus(relu_instructor, tmp_path / "in.txt", tmp_path / "out.npy", instruction=INSTRUCTION,
                  show_progress_bar=False)
    expected = relu_instructor.encode(["first text", "", "third text"], instruction=INSTRUCTION)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)


@pytest.mark.parametrize("line, message", [
    ("{not json", "in.jsonl:2: malformed JSON"),
    (json.dumps({"text": "no instruction here"}), "in.jsonl:2: no instruction; give each line"),
    (json.dumps({"instruction": "x", "text": 5}), "in.jsonl:2: 'text' is missing or not a string"),
    (json.dumps(["a", "b"]), "in.jsonl:2: expected a JSON object"),
])
def test_bad_lines_name_their_line(relu_instructor, tmp_path, line, message):
    good = json.dumps({"instruction": INSTRUCTION, "text": "fine"})
    (tmp_path / "in.jsonl").write_text(f"{good}\n{line}\n{good}\n")
    with pytest.raises(CorpusError, match=message):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", show_progress_bar=False)
    assert not (tmp_path / "out.npy").exists()
    progress = encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", skip_bad_lines=True,
                             show_progress_bar=False)
    assert progress.skipped == 1 and np.load(tmp_path / "out.npy").shape[0] == 2


def test_non_utf8_is_a_clear_error(relu_instructor, tmp_path):
    (tmp_path / "in.txt").write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(CorpusError, match="in.txt:2: not valid UTF-8"):
        encode_corpus(relu_instructor, tmp_path / "in.txt", tmp_path / "out.npy", instruction="",
                      show_progress_bar=False)


def test_interrupted_run_leaves_no_output_and_resumes(relu_instructor, tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "in.jsonl", 50)
    encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "straight.npy", ids_path=tmp_path / "straight.ids",
                  chunk_size=16, show_progress_bar=False)
    encoder = relu_instructor.batch_encoder
    real_encode, calls = encoder.encode, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "out.ids",
                      chunk_size=16, show_progress_bar=False)
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.ids").exists()
    state = json.loads((tmp_path / "out.npy.partial.json").read_text())
    assert state["rows_done"] == 32 and state["lines_done"] == 32
    monkeypatch.setattr(encoder, "encode", real_encode)
    progress = encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "out.ids",
                             chunk_size=16, resume=True, show_progress_bar=False)
    assert progress.rows_done == 50
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), np.load(tmp_path / "straight.npy"))
    assert (tmp_path / "out.ids").read_text() == (tmp_path / "straight.ids").read_text()
    assert not list(tmp_path.glob("*.partial*"))


def test_resume_refuses_a_different_run(relu_instructor, tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "in.jsonl", 20)
    (tmp_path / "out.npy.partial").write_bytes(b"\0" * 128)
    (tmp_path / "out.npy.partial.json").write_text(json.dumps({
        "input": "elsewhere.jsonl", "input_size": 1, "input_mtime": 0.0, "settings": {}}))
    with pytest.raises(ValueError, match="belongs to a different run"):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", resume=True,
                      show_progress_bar=False)


def test_cli_encode(relu_reference, tmp_path, capsys):
    _write_jsonl(tmp_path / "in.jsonl", 10)
    args = ["encode", "--model", str(relu_reference[0]), "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.npy"), "--quiet"]
    cli(args)
    assert "wrote" in capsys.readouterr().out and np.load(tmp_path / "out.npy").shape[0] == 10
    with pytest.raises(SystemExit) as exit_:
        cli(args)
    assert exit_.value.code == 2 and "already exists" in capsys.readouterr().err
