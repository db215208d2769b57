"""`instructor-jax encode`: streamed corpus encoding, bad lines, atomic output, resume."""

import json
import logging

import numpy as np
import pytest

from instructor_jax.cli import main as cli
from instructor_jax.encode.corpus import CorpusError, encode_corpus

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
    truncation = [r.getMessage() for r in caplog.records if r.name == "instructor_jax.encode.corpus"]
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
    interrupt_after(monkeypatch, relu_instructor, 2)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "out.ids",
                      chunk_size=16, show_progress_bar=False)
    assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.ids").exists()
    state = json.loads((tmp_path / "out.npy.partial.json").read_text())
    assert state["rows_done"] == 32 and state["lines_done"] == 32
    monkeypatch.undo()
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


# --- issue 13: progress, empty input, resume fingerprint, locks, Ctrl-C, early errors, BOM, ids ---------------

def test_the_progress_bar_advances_by_texts(relu_instructor, tmp_path, monkeypatch):
    import instructor_jax.encode.corpus as corpus

    seen = []

    class Bar:
        def __init__(self, total, initial, unit, **kwargs):
            self.total, self.n, self.unit = total, initial, unit

        def update(self, n):
            self.n += n
            seen.append(self.n)

        def close(self):
            pass

    monkeypatch.setattr(corpus, "tqdm", Bar)
    monkeypatch.setattr(relu_instructor, "buckets", (64,))  # one program to compile
    _write_jsonl(tmp_path / "in.jsonl", 45)
    encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", chunk_size=16, batch_size=8)
    assert seen[-1] == 45 and 0 < seen[0] < 16  # batch by batch, not all at the end


@pytest.mark.parametrize("content", ["", "\n  \n\n"])
def test_an_empty_input_writes_an_empty_array(relu_reference, tmp_path, capsys, caplog, content):
    (tmp_path / "in.jsonl").write_text(content)
    with caplog.at_level(logging.WARNING):
        cli(["encode", "--model", str(relu_reference[0]), "--input", str(tmp_path / "in.jsonl"),
             "--output", str(tmp_path / "out.npy"), "--ids", str(tmp_path / "ids.txt"), "--quiet"])
    assert np.load(tmp_path / "out.npy").shape == (0, 16) and (tmp_path / "ids.txt").read_text() == ""
    assert "holds no texts to encode" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "in.jsonl", "out.npy"]


def interrupt_after(monkeypatch, model, calls_before):
    """Ctrl-C (KeyboardInterrupt) in the model's encoder after `calls_before` batches (monkeypatch.undo ends it)."""
    encoder = model.batch_encoder
    real, calls = encoder.encode, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) > calls_before:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(encoder, "encode", dying)


def test_resume_refuses_other_weights_at_the_same_path(relu_reference, tmp_path, monkeypatch):
    import shutil

    from safetensors.numpy import load_file, save_file

    from instructor_jax import Instructor

    model_dir = tmp_path / "model"
    shutil.copytree(relu_reference[0], model_dir)
    _write_jsonl(tmp_path / "in.jsonl", 40)
    model = Instructor.from_pretrained(model_dir)
    model.buckets = (64,)  # one program to compile
    interrupt_after(monkeypatch, model, 1)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(model, tmp_path / "in.jsonl", tmp_path / "out.npy", chunk_size=16, show_progress_bar=False)
    monkeypatch.undo()

    def resume(other):
        other.buckets = (64,)
        return encode_corpus(other, tmp_path / "in.jsonl", tmp_path / "out.npy", chunk_size=16, resume=True,
                             show_progress_bar=False)

    with pytest.raises(ValueError, match="different run: .*model_dtype \\('float32' -> 'bfloat16'\\)"):
        resume(Instructor.from_pretrained(model_dir, dtype="bfloat16"))
    original = (model_dir / "model.safetensors").read_bytes()
    tensors = load_file(str(model_dir / "model.safetensors"))
    tensors["shared.weight"] = tensors["shared.weight"] * 2  # same size, other weights
    save_file(tensors, str(model_dir / "model.safetensors"))
    with pytest.raises(ValueError, match="belongs to a different run: the model's weights"):
        resume(Instructor.from_pretrained(model_dir))
    # The same weights written again (a new mtime) still resume: the content hash decides.
    (model_dir / "model.safetensors").write_bytes(original)
    assert resume(model).rows_done == 40


def test_a_second_encode_to_the_same_output_is_refused(relu_instructor, tmp_path):
    import socket
    import subprocess
    import sys

    from instructor_jax.runtime.locks import LockedError

    _write_jsonl(tmp_path / "in.jsonl", 5)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "out.npy.lock").write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                                            "started": 0, "command": "instructor-jax encode"}))
        with pytest.raises(LockedError, match=f"the output .*out.npy is in use by PID {other.pid}"):
            encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", show_progress_bar=False)
        assert not (tmp_path / "out.npy").exists() and not (tmp_path / "out.npy.partial").exists()
    finally:
        other.kill()
        other.wait()
    encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", show_progress_bar=False)
    assert not (tmp_path / "out.npy.lock").exists()  # a dead holder's lock is taken over, then released


def test_ctrl_c_prints_the_resume_command(relu_reference, tmp_path, capsys, monkeypatch):
    import shlex

    from instructor_jax import Instructor

    _write_jsonl(tmp_path / "in.jsonl", 40)
    real_load = Instructor.from_pretrained

    def load_and_break(*args, **kwargs):
        model = real_load(*args, **kwargs)
        interrupt_after(monkeypatch, model, 1)
        return model

    monkeypatch.setattr(Instructor, "from_pretrained", load_and_break)
    args = ["encode", "--model", str(relu_reference[0]), "--input", str(tmp_path / "in.jsonl"),
            "--output", str(tmp_path / "out.npy"), "--chunk_size", "16", "--buckets", "64", "--quiet"]
    with pytest.raises(SystemExit) as exit_:
        cli(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    resume = err.split("To continue: ")[1].strip()
    assert shlex.split(resume) == ["instructor-jax", *args, "--resume"]
    monkeypatch.setattr(Instructor, "from_pretrained", real_load)
    cli(shlex.split(resume)[1:])
    assert np.load(tmp_path / "out.npy").shape == (40, 16)


def test_output_and_buckets_are_checked_before_the_model_loads(relu_reference, tmp_path, capsys, monkeypatch):
    from instructor_jax import Instructor

    _write_jsonl(tmp_path / "in.jsonl", 5)
    (tmp_path / "emb").mkdir()
    base = ["encode", "--model", str(relu_reference[0]), "--input", str(tmp_path / "in.jsonl"), "--quiet"]
    loads = []
    real_load = Instructor.from_pretrained
    monkeypatch.setattr(Instructor, "from_pretrained", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    for extra, message in ((["--output", str(tmp_path / "emb"), "--overwrite"], "is a directory; give the file"),
                           (["--output", str(tmp_path / "o.npy"), "--buckets", "16,x"], "comma-separated integers")):
        with pytest.raises(SystemExit):
            cli(base + extra)
        assert message in capsys.readouterr().err and not loads
    with pytest.raises(SystemExit):
        cli(base + ["--output", str(tmp_path / "o.npy"), "--buckets", "16,32"])
    assert "must be at least the model's max_seq_length (64)" in capsys.readouterr().err
    assert not (tmp_path / "o.npy.partial").exists()


def test_a_byte_order_mark_is_accepted(relu_instructor, tmp_path):
    rows = _write_jsonl(tmp_path / "plain.jsonl", 3)
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.jsonl").read_bytes())
    encode_corpus(relu_instructor, tmp_path / "bom.jsonl", tmp_path / "out.npy", show_progress_bar=False)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"),
                               relu_instructor.encode([[r["instruction"], r["text"]] for r in rows]), atol=1e-6)


def test_ids_with_line_breaks_are_refused(relu_instructor, tmp_path):
    lines = [{"id": "a", "instruction": "", "text": "x"}, {"id": "b\nc", "instruction": "", "text": "y"}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(CorpusError, match="in.jsonl:2: the id 'b\\\\nc' contains a line break"):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "ids.txt",
                      show_progress_bar=False)
    progress = encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy",
                             ids_path=tmp_path / "ids.txt", skip_bad_lines=True, show_progress_bar=False)
    assert progress.skipped == 1 and (tmp_path / "ids.txt").read_text() == "a\n"
    assert np.load(tmp_path / "out.npy").shape[0] == 1


# --- issue 14: the storage dtype (the multi-process cases: tests/encode/test_corpus_shards.py) -----------------------

def test_cli_store_dtype(relu_reference, tmp_path, capsys):
    from instructor_jax import open_embeddings

    _write_jsonl(tmp_path / "in.jsonl", 6)
    base = ["encode", "--model", str(relu_reference[0]), "--input", str(tmp_path / "in.jsonl"), "--quiet"]
    cli(base + ["--output", str(tmp_path / "f32.npy")])
    cli(base + ["--output", str(tmp_path / "f16.npy"), "--store_dtype", "float16"])
    assert np.load(tmp_path / "f16.npy").dtype == np.float16
    np.testing.assert_allclose(np.asarray(open_embeddings(tmp_path / "f16.npy"), np.float32),
                               np.load(tmp_path / "f32.npy"), atol=1e-3)
    with pytest.raises(SystemExit):
        cli(base + ["--output", str(tmp_path / "x.npy"), "--store_dtype", "int8"])
    assert "invalid choice: 'int8'" in capsys.readouterr().err


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.fast
@pytest.mark.parametrize("flag", ["--output", "--ids", "--output-via-link"])
def test_an_output_naming_the_input_is_refused_even_with_overwrite(tmp_path, capsys, flag):
    _write_jsonl(tmp_path / "in.jsonl", 3)
    before = (tmp_path / "in.jsonl").read_bytes()
    (tmp_path / "link.jsonl").symlink_to(tmp_path / "in.jsonl")
    outputs = {"--output": ["--output", str(tmp_path / "in.jsonl")],
               "--ids": ["--output", str(tmp_path / "o.npy"), "--ids", str(tmp_path / "in.jsonl")],
               "--output-via-link": ["--output", str(tmp_path / "link.jsonl")]}[flag]
    with pytest.raises(SystemExit) as exit_:
        cli(["encode", "--model", str(tmp_path / "never-loaded"), "--input", str(tmp_path / "in.jsonl"), "--quiet",
             "--overwrite", *outputs])
    assert exit_.value.code == 2 and "is the input file" in capsys.readouterr().err
    assert (tmp_path / "in.jsonl").read_bytes() == before


def test_encode_corpus_refuses_to_write_its_input(relu_instructor, tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", 3)
    before = (tmp_path / "in.jsonl").read_bytes()
    with pytest.raises(ValueError, match="is the input file"):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "o.npy", ids_path=tmp_path / "in.jsonl",
                      overwrite=True, show_progress_bar=False)
    assert (tmp_path / "in.jsonl").read_bytes() == before


def test_a_lone_surrogate_is_a_bad_line_that_can_be_skipped(relu_instructor, tmp_path):
    good = json.dumps({"instruction": INSTRUCTION, "text": "fine"})
    (tmp_path / "in.jsonl").write_text(f'{good}\n{{"instruction": "", "text": "half \\ud83d a pair"}}\n{good}\n')
    with pytest.raises(CorpusError, match=r"in.jsonl:2: the text holds a lone surrogate, U\+D83D"):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", show_progress_bar=False)
    progress = encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", skip_bad_lines=True,
                             show_progress_bar=False)
    assert progress.skipped == 1 and np.load(tmp_path / "out.npy").shape[0] == 2


def test_resume_accepts_the_same_model_spelt_another_way(relu_instructor, relu_reference, tmp_path, monkeypatch):
    import copy

    _write_jsonl(tmp_path / "in.jsonl", 20)
    interrupt_after(monkeypatch, relu_instructor, 1)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", chunk_size=8,
                      show_progress_bar=False)
    monkeypatch.undo()
    (tmp_path / "link").symlink_to(relu_instructor.source)
    respelt = copy.copy(relu_instructor)
    respelt.source = tmp_path / "link"  # as from_pretrained("link") or a relative path gives it
    assert encode_corpus(respelt, tmp_path / "in.jsonl", tmp_path / "out.npy", chunk_size=8, resume=True,
                         show_progress_bar=False).rows_done == 20
    other = copy.copy(relu_instructor)
    other.source = tmp_path  # another directory is still another run
    interrupt_after(monkeypatch, relu_instructor, 1)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "o2.npy", chunk_size=8,
                      show_progress_bar=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match=r"belongs to a different run: .*model \('"):
        encode_corpus(other, tmp_path / "in.jsonl", tmp_path / "o2.npy", chunk_size=8, resume=True,
                      show_progress_bar=False)


@pytest.mark.fast
def test_ids_that_are_not_strings_are_written_as_json(tmp_path):
    from instructor_jax.encode.corpus import read_records

    ids = [["a", "b"], {"k": 1, "é": None}, True, False, 7, 1.5, "plain", "naïve"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"id": i, "instruction": "", "text": "x"}) + "\n" for i in ids))
    got = [r.id for r in read_records(tmp_path / "in.jsonl", "jsonl", check_ids=True)]
    assert got == ['["a", "b"]', '{"k": 1, "é": null}', "true", "false", "7", "1.5", "plain", "naïve"]


@pytest.mark.fast
def test_text_input_without_an_instruction_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from instructor_jax import Instructor

    monkeypatch.setattr(Instructor, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    (tmp_path / "in.txt").write_text("first text\nsecond\n")
    with pytest.raises(SystemExit) as exit_:
        cli(["encode", "--model", "m", "--input", str(tmp_path / "in.txt"), "--output", str(tmp_path / "o.npy")])
    assert exit_.value.code == 2 and "plain-text input needs --instruction" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
