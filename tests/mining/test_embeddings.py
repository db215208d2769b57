"""`data mine`'s embeddings through encode's machinery: resumed after an interruption, reused when finished,
refused when they belong to other texts, never written into a directory holding other files."""

import json
import pathlib

import numpy as np
import pytest

from instructor_jax.encode import corpus
from instructor_jax.mining import embeddings

SAMPLE = pathlib.Path(__file__).parents[2] / "instructor_jax" / "assets" / "medi_sample" / "train.jsonl"


def sample_items(count=40):
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()[:count]]
    return [tuple(r["query"]) for r in rows] + [tuple(r["pos"]) for r in rows]


def test_an_interrupted_encoding_resumes_and_a_finished_one_is_reused(relu_instructor, tmp_path, monkeypatch):
    items = embeddings.distinct(sample_items())
    expected = relu_instructor.encode([list(i) for i in items], batch_size=8, show_progress_bar=False)
    calls = {"n": 0}
    tokenize = corpus._tokenize_chunk

    def interrupted_in_the_third_chunk(model, chunk):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return tokenize(model, chunk)

    monkeypatch.setattr(corpus, "_tokenize_chunk", interrupted_in_the_third_chunk)
    work = tmp_path / "mined.jsonl.work"
    with pytest.raises(KeyboardInterrupt):
        embeddings.encode_items(relu_instructor, items, work, batch_size=8, chunk_size=16, show_progress_bar=False)
    assert json.loads(next(work.glob("*.partial.json")).read_text())["rows_done"] == 32
    monkeypatch.setattr(corpus, "_tokenize_chunk", tokenize)

    vectors, counts = embeddings.encode_items(relu_instructor, items, work, resume=True, batch_size=8, chunk_size=16,
                                              show_progress_bar=False)
    assert counts == {"texts": len(items), "encoded": len(items) - 32, "reused": 32}
    np.testing.assert_allclose(vectors, expected, atol=2e-6)

    again, counts = embeddings.encode_items(relu_instructor, items, work, resume=True, batch_size=8, chunk_size=16,
                                            show_progress_bar=False)
    assert counts == {"texts": len(items), "encoded": 0, "reused": len(items)}
    np.testing.assert_array_equal(again, vectors)

    with pytest.raises(ValueError, match="--resume: the texts to embed are not those of the run"):
        embeddings.encode_items(relu_instructor, items[:-1], work, resume=True, show_progress_bar=False)
    # Without --resume the work directory is this run's: encoded anew.
    fewer, counts = embeddings.encode_items(relu_instructor, items[:-1], work, batch_size=8, show_progress_bar=False)
    assert counts["encoded"] == len(items) - 1
    np.testing.assert_allclose(fewer, expected[:-1], atol=2e-6)


@pytest.mark.fast
def test_a_work_dir_holding_other_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds files this program did not write"):
        embeddings.prepare_work_dir(tmp_path, [("i", "t")], resume=False)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        embeddings.prepare_work_dir(tmp_path / "file", [("i", "t")], resume=False)


@pytest.mark.fast
def test_the_texts_file_escapes_line_breaks_and_is_kept_when_unchanged(tmp_path):
    items = [("Represent: ", "a\u2028b\nc"), ("", "d")]
    path = embeddings.prepare_work_dir(tmp_path / "w", items, resume=False)
    assert len(path.read_bytes().splitlines()) == 2
    assert [tuple(json.loads(line).values()) for line in path.read_text().splitlines()] == items
    before = path.stat().st_mtime_ns
    assert embeddings.prepare_work_dir(tmp_path / "w", items, resume=True) == path
    assert path.stat().st_mtime_ns == before
