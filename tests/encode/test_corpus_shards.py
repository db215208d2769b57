"""Corpus encoding across processes (issue 14): shares of the input, shards and their manifest, resume,
refusals, storage dtypes, reading and merging, gs:// URLs.

The pure parts (where shares start, the embeddings view) need no processes. The multi-process part is one
module-scoped run: two real processes x two CPU devices, started through launch/local_multiprocess.sh and
killed mid-run; then one driver pair that resumes it and runs the other multi-process cases one after the
other in the same two processes (each start of a JAX process pair costs seconds); the assertions share it.
"""

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

import ml_dtypes
import numpy as np
import pytest

from instructor_jax.encode import corpus, corpus_shards, embedding_store
from instructor_jax.cli import main as cli
from instructor_jax import open_embeddings
from instructor_jax.encode.corpus import encode_corpus
from instructor_jax.encode.corpus_shards import ProcessGroup, Share
from tests.encode.test_corpus import interrupt_after
from tests.runtime.test_distributed import child_env, free_port

REPO = pathlib.Path(__file__).parents[2]
INSTRUCTION = "Represent the sentence: "


# ---------------------------------------------------------------------------------------------------------
# Shares: byte ranges cut at line starts (pure: io.BytesIO stands in for the file)


def _shares(data: bytes, count: int) -> list[Share]:
    f = io.BytesIO(data)
    shares = []
    for i in range(count):
        start, end = corpus_shards.share_bounds(f, len(data), i, count)
        lines = data[start:end].splitlines(keepends=True)  # b"\r" alone never occurs in these inputs
        shares.append(Share(i, count, start, end, lines=len(lines)))
    return corpus_shards.number_shares(shares)


AWKWARD = {
    "empty": b"",
    "one line": b'{"text": "a"}\n',
    "one line, no newline": b'{"text": "a"}',
    "no trailing newline": b"first\nsecond\nthird",
    "crlf": b"first\r\nsecond\r\n\r\nfourth\r\n",
    "blank lines": b"\n\n\nx\n\n\ny\n\n",
    "a line longer than a share": b"short\n" + b"L" * 500 + b"\nshort again\nend\n",
    "only newlines": b"\n" * 7,
}


@pytest.mark.parametrize("name", list(AWKWARD))
@pytest.mark.parametrize("count", [1, 2, 3, 5, 16])
def test_shares_are_whole_lines_contiguous_and_numbered_globally(name, count, monkeypatch):
    monkeypatch.setattr(corpus_shards, "SCAN_BLOCK", 3)  # the scan for a newline crosses blocks
    data = AWKWARD[name]
    shares = _shares(data, count)
    assert shares[0].start == 0 and shares[-1].end == len(data)
    assert all(a.end == b.start for a, b in zip(shares, shares[1:]))
    for share in shares:
        assert share.start == len(data) or share.start == 0 or data[share.start - 1:share.start] == b"\n"
    # Line numbers: each share's lines, numbered from its first_line, are the whole file's lines.
    whole = list(enumerate(data.splitlines(keepends=True), start=1))
    numbered = [(share.first_line + k, line) for share in shares
                for k, line in enumerate(data[share.start:share.end].splitlines(keepends=True))]
    assert numbered == whole


def test_line_start_at_or_after():
    data = b"ab\ncd\n\nef"
    f = io.BytesIO(data)
    found = [corpus_shards.line_start_at_or_after(f, offset, len(data)) for offset in range(len(data) + 2)]
    assert found == [0, 3, 3, 3, 6, 6, 6, 7, 9, 9, 9]  # 9: the end (no line starts in "ef")
    assert corpus_shards.share_bounds(io.BytesIO(b""), 0, 0, 2) == (0, 0)
    with pytest.raises(ValueError, match="share 2 of 2"):
        corpus_shards.share_bounds(f, len(data), 2, 2)


def test_a_share_is_read_with_its_global_line_numbers(tmp_path):
    good = json.dumps({"instruction": "", "text": "x"})
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + f"{good}\r\n\r\n{good}\n{{bad\n{good}".encode())  # BOM, CRLF, blank, bad
    size = path.stat().st_size
    with open(path, "rb") as f:
        bounds = [corpus_shards.share_bounds(f, size, i, 2) for i in range(2)]
    shares = corpus_shards.number_shares([corpus_shards.plan_share(path, "jsonl", i, 2) for i in range(2)])
    assert [(s.start, s.end) for s in shares] == bounds
    assert sum(s.lines for s in shares) == 5 and sum(s.texts for s in shares) == 4
    lines = [r.line for s in shares for r in corpus.read_records(
        path, "jsonl", skip_bad_lines=True, byte_range=(s.start, s.end), first_line=s.first_line)]
    assert lines == [1, 3, 4, 5]  # as one reader numbers them; line 2 is blank
    errors = [r.error for s in shares for r in corpus.read_records(
        path, "jsonl", skip_bad_lines=True, byte_range=(s.start, s.end), first_line=s.first_line) if r.error]
    assert len(errors) == 1 and "in.jsonl:4: malformed JSON" in errors[0]


def test_an_error_on_one_process_stops_all_with_its_message():
    def group(index, others):
        return ProcessGroup(index, 2, lambda value: [value if i == index else others for i in range(2)])

    ok = {"value": 7, "error": None}
    assert corpus_shards.step(group(0, ok), lambda: 7) == [7, 7]
    failed = {"value": None, "error": "in.jsonl:9: malformed JSON"}
    with pytest.raises(corpus_shards.OtherProcessFailed, match="process 1 of 2 failed: in.jsonl:9: malformed JSON"):
        corpus_shards.step(group(0, failed), lambda: 7)
    with pytest.raises(FileNotFoundError, match="mine"):  # the failing process raises its own error
        corpus_shards.step(group(1, ok), lambda: (_ for _ in ()).throw(FileNotFoundError("mine")))


# ---------------------------------------------------------------------------------------------------------
# The store: names, the view, dtypes, manifests, merging (no model)


def test_names():
    assert embedding_store.shard_path("out/emb.npy", 1, 4) == "out/emb-00001-of-00004.npy"
    assert embedding_store.shard_path("gs://b/x/ids.txt", 0, 2) == "gs://b/x/ids-00000-of-00002.txt"
    assert embedding_store.shard_path("ids", 0, 2) == "ids-00000-of-00002"
    assert embedding_store.manifest_path("out/emb.npy") == "out/emb.manifest.json"
    assert embedding_store.parse_shard_name("o/emb.npy", "emb-00003-of-00008.npy.partial.json") == (3, 8)
    assert embedding_store.parse_shard_name("o/emb.npy", "emb-x-00003-of-00008.npy") is None
    assert embedding_store.relative_to("gs://b/x/e.npy", "gs://b/x") == "e.npy"
    assert embedding_store.relative_to("gs://c/x/e.npy", "gs://b/x") == "gs://c/x/e.npy"


def _write_npy(path, rows: np.ndarray, dtype: str):
    with open(path, "wb") as f:
        f.write(b"\0" * embedding_store.NPY_HEADER_BYTES)
        f.write(rows.astype(embedding_store.store_dtype(dtype)).tobytes())
        embedding_store.write_npy_header(f, len(rows), rows.shape[1], dtype)


def _manifest(tmp_path, parts, dtype="float32", ids=True) -> pathlib.Path:
    shards = []
    for i, rows in enumerate(parts):
        _write_npy(tmp_path / f"e-{i}.npy", rows, dtype)
        if ids:
            (tmp_path / f"i-{i}.txt").write_text("".join(f"{i}:{k}\n" for k in range(len(rows))))
        shards.append({"embeddings": f"e-{i}.npy", "ids": f"i-{i}.txt" if ids else None, "rows": len(rows)})
    path = tmp_path / "e.manifest.json"
    embedding_store.write_manifest(path, {"format": embedding_store.MANIFEST_FORMAT, "version": 1,
                                          "dim": parts[0].shape[1], "store_dtype": dtype, "shards": shards})
    return path


def test_the_view_indexes_like_one_array(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.normal(size=(n, 3)).astype(np.float32) for n in (4, 0, 5, 1)]  # an empty shard too
    whole = np.concatenate(parts)
    view = open_embeddings(_manifest(tmp_path, parts))
    assert view.shape == (10, 3) and len(view) == 10 and view.dtype == np.float32
    for key in (3, -1, slice(None), slice(2, 7), slice(9, 2, -2), slice(20, 30), [0, 9, 4, 4],
                np.array([[1, 5], [6, 0]]), whole[:, 0] > 0, (slice(1, 8), 2), (np.array([2, 3]), slice(0, 2)), (5, 1)):
        np.testing.assert_array_equal(view[key], whole[key], err_msg=str(key))
    np.testing.assert_array_equal(np.asarray(view), whole)
    assert view.ids == [f"{i}:{k}" for i, p in enumerate(parts) for k in range(len(p))]
    for bad in (10, -11, [10], (1, 2, 3), np.ones(3, bool), np.array([0.5])):
        with pytest.raises(IndexError):
            view[bad]
    # A plain .npy (what one process writes) is read the same way.
    np.save(tmp_path / "plain.npy", whole)
    (tmp_path / "plain.txt").write_text("".join(f"{k}\n" for k in range(10)))
    plain = open_embeddings(tmp_path / "plain.npy", ids=tmp_path / "plain.txt")
    np.testing.assert_array_equal(plain[2:4], whole[2:4])
    assert plain.ids == [str(k) for k in range(10)] and open_embeddings(tmp_path / "plain.npy").ids is None


@pytest.mark.parametrize("dtype, tolerance", [("float16", 1e-3), ("bfloat16", 4e-3), ("float32", 0)])
def test_store_dtypes_round_trip_and_merge(tmp_path, dtype, tolerance):
    rng = np.random.default_rng(1)
    parts = [rng.uniform(-1, 1, size=(n, 8)).astype(np.float32) for n in (3, 5)]
    view = open_embeddings(_manifest(tmp_path, parts, dtype))
    assert view.dtype == embedding_store.store_dtype(dtype)
    np.testing.assert_allclose(np.asarray(view).astype(np.float32), np.concatenate(parts), atol=tolerance, rtol=0)
    embedding_store.merge(tmp_path / "e.manifest.json", tmp_path / "merged.npy", tmp_path / "merged.ids")
    raw = np.load(tmp_path / "merged.npy")
    assert raw.dtype.str == embedding_store.store_dtype(dtype).str.replace("<V", "|V")  # bfloat16: 2-byte void
    merged = embedding_store.load_npy(tmp_path / "merged.npy")
    np.testing.assert_array_equal(merged, np.asarray(view))
    assert (tmp_path / "merged.ids").read_text().splitlines() == view.ids
    if dtype == "bfloat16":
        np.testing.assert_array_equal(raw.view(ml_dtypes.bfloat16), merged)  # as the module docstring says
    with pytest.raises(FileExistsError, match="--overwrite"):
        embedding_store.merge(tmp_path / "e.manifest.json", tmp_path / "merged.npy")
    for target in ("e-1.npy", "i-0.txt", "e.manifest.json"):  # never over what it reads, even with overwrite
        with pytest.raises(ValueError, match="one of the files being merged"):
            embedding_store.merge(tmp_path / "e.manifest.json", tmp_path / target, tmp_path / "x.ids", overwrite=True)
    assert not list(tmp_path.glob("*.partial"))


def test_a_manifest_that_does_not_match_its_shards_is_refused(tmp_path):
    path = _manifest(tmp_path, [np.zeros((2, 4), np.float32)], ids=False)
    manifest = json.loads(path.read_text())
    assert open_embeddings(path).ids is None
    for change, message in (({"rows": 3}, "holds 2 rows of dim 4 but .* records 3"),
                            ({"store_dtype": "float16"}, "holds float32 rows but")):
        target = dict(manifest, **{k: v for k, v in change.items() if k != "rows"})
        if "rows" in change:
            target["shards"] = [dict(manifest["shards"][0], rows=change["rows"])]
        embedding_store.write_manifest(path, target)
        with pytest.raises(ValueError, match=message):
            open_embeddings(path)
    embedding_store.write_manifest(path, dict(manifest, version=2))
    with pytest.raises(ValueError, match="version 2 manifest"):
        open_embeddings(path)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not an instructor-jax embeddings manifest"):
        open_embeddings(tmp_path / "junk.json")
    with pytest.raises(FileNotFoundError, match="nor does a manifest"):
        open_embeddings(tmp_path / "absent.npy")


# ---------------------------------------------------------------------------------------------------------
# One process: what it writes is what it wrote before; --store_dtype; gs:// (etils' mock)


def _write_jsonl(path, n, blank_every=0, without_id_every=3, seed=0):
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        if blank_every and i % blank_every == blank_every - 1:
            lines.append("")
            continue
        record = {"instruction": INSTRUCTION, "text": "a small dog " * int(rng.integers(0, 12)) + str(i)}
        if without_id_every and i % without_id_every:
            record["id"] = f"doc-{i}"
        lines.append(json.dumps(record))
    pathlib.Path(path).write_text("".join(line + "\n" for line in lines))


OLD_SETTINGS = {"model", "dim", "dtype", "model_dtype", "pooling_rule", "max_seq_length", "do_lower_case", "buckets",
                "packing", "normalize", "instruction", "format", "ids"}


def test_one_process_writes_what_it_wrote_before(relu_instructor, tmp_path, monkeypatch):
    _write_jsonl(tmp_path / "in.jsonl", 40)
    interrupt_after(monkeypatch, relu_instructor, 1)
    with pytest.raises(KeyboardInterrupt):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "ids.txt",
                      chunk_size=16, show_progress_bar=False)
    # The partial files of an interrupted default run: the same names and fingerprint keys as before issue 14
    # (so partial files left by an older version still resume).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt.partial", "in.jsonl", "out.npy.partial",
                                                          "out.npy.partial.json"]
    assert set(json.loads((tmp_path / "out.npy.partial.json").read_text())["settings"]) == OLD_SETTINGS
    monkeypatch.undo()
    encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "out.npy", ids_path=tmp_path / "ids.txt",
                  chunk_size=16, resume=True, show_progress_bar=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "in.jsonl", "out.npy"]
    data = (tmp_path / "out.npy").read_bytes()
    old_header = repr({"descr": "<f4", "fortran_order": False, "shape": (40, 16)}).encode("latin1")
    assert data[:128] == b"\x93NUMPY\x01\x00" + (118).to_bytes(2, "little") + old_header.ljust(117) + b"\n"
    assert len(data) == 128 + 40 * 16 * 4 and np.load(tmp_path / "out.npy").dtype == np.float32


def test_store_dtype_in_one_process(relu_instructor, tmp_path):
    _write_jsonl(tmp_path / "in.jsonl", 30)
    reference = None
    for dtype, tolerance in (("float32", 0), ("float16", 1e-3), ("bfloat16", 4e-3)):
        out = tmp_path / f"{dtype}.npy"
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", out, chunk_size=16, store_dtype=dtype,
                      show_progress_bar=False)
        assert out.stat().st_size == 128 + 30 * 16 * embedding_store.store_dtype(dtype).itemsize
        view = open_embeddings(out)
        assert view.dtype == embedding_store.store_dtype(dtype)
        rows = np.asarray(view).astype(np.float32)
        reference = rows if reference is None else reference
        np.testing.assert_allclose(rows, reference, atol=tolerance, rtol=0)
    with pytest.raises(ValueError, match="storage dtype must be one of float32, float16, bfloat16"):
        encode_corpus(relu_instructor, tmp_path / "in.jsonl", tmp_path / "x.npy", store_dtype="int8",
                      show_progress_bar=False)


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    """gs:// through etils' mock backend: gs://bucket/x is ./gs:/bucket/x under tmp_path; staging and read
    caches under tmp_path too."""
    from etils.epath import testing as epath_testing

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    bucket = tmp_path / "gs:" / "bucket"
    bucket.mkdir(parents=True)
    with epath_testing.mock_epath():
        yield bucket


def test_gs_input_and_output_in_one_process(relu_instructor, tmp_path, fake_gcs, capsys):
    _write_jsonl(fake_gcs / "in.jsonl", 25, blank_every=7)
    _write_jsonl(tmp_path / "local.jsonl", 25, blank_every=7)
    encode_corpus(relu_instructor, "gs://bucket/in.jsonl", "gs://bucket/out/emb.npy",
                  ids_path="gs://bucket/out/ids.txt", chunk_size=8, show_progress_bar=False)
    encode_corpus(relu_instructor, tmp_path / "local.jsonl", tmp_path / "local.npy", ids_path=tmp_path / "local.txt",
                  chunk_size=8, show_progress_bar=False)
    assert sorted(p.name for p in (fake_gcs / "out").iterdir()) == ["emb.npy", "ids.txt"]
    assert (fake_gcs / "out" / "emb.npy").read_bytes() == (tmp_path / "local.npy").read_bytes()
    assert (fake_gcs / "out" / "ids.txt").read_text() == (tmp_path / "local.txt").read_text()
    staged = [p for p in (tmp_path / "tmp").rglob("*") if p.is_file()]
    assert staged == [], staged  # uploaded, then removed from the staging directory
    with pytest.raises(FileExistsError, match="gs://bucket/out/emb.npy already exists"):
        encode_corpus(relu_instructor, "gs://bucket/in.jsonl", "gs://bucket/out/emb.npy", show_progress_bar=False)
    view = open_embeddings("gs://bucket/out/emb.npy", ids="gs://bucket/out/ids.txt")
    np.testing.assert_array_equal(np.asarray(view), np.load(tmp_path / "local.npy"))
    assert view.ids == (tmp_path / "local.txt").read_text().split()


# ---------------------------------------------------------------------------------------------------------
# Several processes: one module-scoped run that the tests below read


DRIVER = textwrap.dedent("""
    # Runs instructor-jax encode jobs one after another in this process (one of two), reporting each.
    import contextlib, io, json, logging, os, sys
    from instructor_jax.cli import main

    jobs = json.loads(open(sys.argv[1]).read())
    for job in jobs:
        out, err = io.StringIO(), io.StringIO()
        mock = contextlib.nullcontext()
        if job.get("gs"):
            from etils.epath import testing as epath_testing
            mock = epath_testing.mock_epath()
        with mock, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(job["argv"] + sys.argv[2:])
                code = 0
            except SystemExit as e:
                code = e.code
        logging.getLogger().handlers.clear()  # main's basicConfig: the next job's log goes to its own stderr
        print("JOB " + json.dumps({"name": job["name"], "code": code, "out": out.getvalue(),
                                   "err": err.getvalue()[-3000:]}), flush=True)
""")

BIG_LINES = 5000


def _process_pair(argv_of, env, logs, timeout, cwd=REPO):
    children = [subprocess.Popen(argv_of(i), env=env, cwd=cwd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
                for i, log in enumerate(logs)]
    try:
        for p in children:
            p.wait(timeout=max(1, timeout))
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in children], [pathlib.Path(log).read_text() for log in logs]


@pytest.fixture(scope="module")
def sharded(relu_reference, tmp_path_factory):
    """Everything the multi-process tests look at: one killed run, its resume and the other jobs, and the
    single-process reference."""
    root = tmp_path_factory.mktemp("sharded")
    model = str(relu_reference[0])
    _write_jsonl(root / "big.jsonl", BIG_LINES, blank_every=97)
    (root / "one.jsonl").write_text(json.dumps({"instruction": INSTRUCTION, "text": "only line"}))  # no newline
    (root / "empty.jsonl").write_text("")
    (root / "gs:" / "bucket").mkdir(parents=True)
    _write_jsonl(root / "gs:" / "bucket" / "small.jsonl", 40, seed=3)
    _write_jsonl(root / "bad.jsonl", 60, seed=4)
    lines = (root / "bad.jsonl").read_text().splitlines(keepends=True)
    (root / "bad.jsonl").write_text("".join(lines[:54] + ["{not json\n"] + lines[55:]))  # line 55: process 1's
    (root / "tmp").mkdir()
    env = child_env(2)
    env["TMPDIR"] = str(root / "tmp")  # the gs:// job's staging directories
    big = ["encode", "--model", model, "--input", str(root / "big.jsonl"), "--output", str(root / "out" / "emb.npy"),
           "--ids", str(root / "out" / "ids.txt"), "--quiet"]

    # 1. Two processes through launch/local_multiprocess.sh, small chunks; process 1 is SIGKILLed as soon as
    # its partial file shows progress; the script then stops process 0.
    launch_env = dict(env, INSTRUCTOR_JAX=f"{sys.executable} -m instructor_jax.cli", DEVICES_PER_PROCESS="2")
    launch_log = root / "launch.log"
    script = subprocess.Popen(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", *big, "--chunk_size", "8"],
                              env=launch_env, cwd=REPO, stdout=open(launch_log, "w"), stderr=subprocess.STDOUT,
                              start_new_session=True)
    state = root / "out" / "emb-00001-of-00002.npy.partial.json"
    killed = None
    try:
        deadline = time.monotonic() + 120
        while killed is None:
            assert time.monotonic() < deadline and script.poll() is None, launch_log.read_text()[-3000:]
            with contextlib.suppress(FileNotFoundError, ValueError):
                if json.loads(state.read_text())["rows_done"] > 0:
                    holder = json.loads((root / "out" / "emb-00001-of-00002.npy.lock").read_text())
                    os.kill(holder["pid"], signal.SIGKILL)
                    killed = json.loads(state.read_text())["rows_done"]
            time.sleep(0.01)
        script.wait(timeout=60)
    finally:
        if script.poll() is None:
            os.killpg(script.pid, signal.SIGKILL)
            script.wait()
    after_kill = sorted(p.name for p in (root / "out").iterdir())

    # 2. The resume and the other cases, one driver pair.
    def job(name, argv, **extra):
        return {"name": name, "argv": argv, **extra}

    small = ["--model", model, "--quiet", "--ids"]
    jobs = [
        job("resume", big + ["--resume", "--chunk_size", "500"]),
        job("resume again, other settings", big + ["--resume", "--no_normalize"]),
        job("manifest exists", big),
        job("one line", ["encode", *small, str(root / "one" / "ids.txt"), "--input", str(root / "one.jsonl"),
                         "--output", str(root / "one" / "emb.npy"), "--store_dtype", "bfloat16"]),
        job("empty", ["encode", *small, str(root / "empty" / "ids.txt"), "--input", str(root / "empty.jsonl"),
                      "--output", str(root / "empty" / "emb.npy")]),
        job("bad line", ["encode", *small, str(root / "bad" / "ids.txt"), "--input", str(root / "bad.jsonl"),
                         "--output", str(root / "bad" / "emb.npy")]),
        job("bad line skipped on resume", ["encode", *small, str(root / "bad" / "ids.txt"), "--input",
                                           str(root / "bad.jsonl"), "--output", str(root / "bad" / "emb.npy"),
                                           "--resume", "--skip_bad_lines"]),
        job("gs", ["encode", *small, "gs://bucket/out/ids.txt", "--input", "gs://bucket/small.jsonl", "--output",
                   "gs://bucket/out/emb.npy", "--store_dtype", "float16", "--chunk_size", "8"], gs=True),
    ]
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "driver.py").write_text(DRIVER)
    coordinator = f"127.0.0.1:{free_port()}"
    codes, logs = _process_pair(
        lambda i: [sys.executable, str(root / "driver.py"), str(root / "jobs.json"), "--coordinator_address",
                   coordinator, "--num_processes", "2", "--process_id", str(i)],
        env, [root / f"driver_{i}.log" for i in range(2)], timeout=240, cwd=root)
    assert codes == [0, 0], "\n----\n".join(log[-4000:] for log in logs)
    results = [{r["name"]: r for r in (json.loads(line[4:]) for line in log.splitlines() if line.startswith("JOB "))}
               for log in logs]

    # 3. The reference: one process, this one (8 devices), same settings.
    from instructor_jax import Instructor

    reference = Instructor.from_pretrained(model)
    encode_corpus(reference, root / "big.jsonl", root / "single.npy", ids_path=root / "single.txt",
                  show_progress_bar=False)
    return dict(root=root, model=model, killed=killed, after_kill=after_kill, launch_log=launch_log.read_text(),
                launch_code=script.returncode, results=results, logs=logs)


def _result(sharded, name):
    both = [r[name] for r in sharded["results"]]
    assert len(both) == 2
    return both


def test_two_processes_encode_like_one(sharded):
    root = sharded["root"]
    for result in _result(sharded, "resume"):
        assert result["code"] == 0, result["err"]
    view = open_embeddings(root / "out" / "emb.npy")  # the --output: its manifest is found beside it
    single = np.load(root / "single.npy")
    assert view.shape == single.shape == (BIG_LINES - BIG_LINES // 97, 16)
    np.testing.assert_allclose(np.asarray(view), single, atol=1e-6, rtol=0)
    assert view.ids == (root / "single.txt").read_text().splitlines()
    assert view.ids[:4] == ["1", "doc-1", "doc-2", "4"]  # the line number where the input gives no id
    manifest = json.loads((root / "out" / "emb.manifest.json").read_text())
    shards = manifest["shards"]
    assert (manifest["num_processes"], manifest["rows"], manifest["dim"], manifest["store_dtype"]) == (2, len(view), 16,
                                                                                                       "float32")
    assert [s["embeddings"] for s in shards] == ["emb-00000-of-00002.npy", "emb-00001-of-00002.npy"]
    assert [s["ids"] for s in shards] == ["ids-00000-of-00002.txt", "ids-00001-of-00002.txt"]
    assert shards[0]["first_line"] == 1 and shards[1]["first_line"] == shards[0]["lines"] + 1
    assert shards[0]["bytes"][0] == 0 and shards[0]["bytes"][1] == shards[1]["bytes"][0]
    assert shards[1]["bytes"][1] == (root / "big.jsonl").stat().st_size
    assert sum(s["rows"] for s in shards) == len(view) and all(s["rows"] > 2000 for s in shards)
    assert "share" not in manifest["settings"] and manifest["settings"]["ids"] is True
    assert sorted(p.name for p in (root / "out").iterdir() if "partial" in p.name or p.suffix == ".lock") == []


def test_a_killed_run_resumes_where_each_shard_stopped(sharded):
    root = sharded["root"]
    assert sharded["killed"] and sharded["launch_code"] != 0, sharded["launch_log"][-3000:]
    assert "a process failed" in sharded["launch_log"]
    assert "emb-00001-of-00002.npy.partial" in sharded["after_kill"]  # what the killed process left
    resumed = _result(sharded, "resume")[1]["err"]
    assert "resuming at line" in resumed and "taking over the stale lock" in resumed, resumed
    # The resume is the rest of the same run: its result is the uninterrupted one (previous test).
    assert (root / "out" / "process_logs" / "process_1.log").is_file()  # the launcher's log dir: beside the output


def test_merge_writes_one_file(sharded, capsys):
    root = sharded["root"]
    cli(["encode", "--merge", str(root / "out" / "emb.manifest.json"), str(root / "merged.npy")])
    assert "wrote" in capsys.readouterr().out
    np.testing.assert_array_equal(np.load(root / "merged.npy"), np.asarray(open_embeddings(root / "out" / "emb.npy")))
    np.testing.assert_allclose(np.load(root / "merged.npy"), np.load(root / "single.npy"), atol=1e-6, rtol=0)
    assert (root / "merged.ids.txt").read_text() == (root / "single.txt").read_text()
    with pytest.raises(SystemExit) as exit_:
        cli(["encode", "--merge", str(root / "out" / "emb.manifest.json"), str(root / "merged.npy")])
    assert exit_.value.code == 2 and "already exists; pass --overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["encode", "--merge", str(root / "out" / "emb.manifest.json"), str(root / "m2.npy"), "--model", "x"])
    assert "takes no --model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["encode", "--input", "x.jsonl"])
    assert "encode needs --model, --output" in capsys.readouterr().err


def test_refusals(sharded, capsys, monkeypatch):
    root = sharded["root"]
    for result in _result(sharded, "resume again, other settings"):
        assert result["code"] == 2 and "was made by a different run: normalize (True -> False)" in result["err"], \
            result["err"]
    for result in _result(sharded, "manifest exists"):
        assert result["code"] == 2 and "emb.manifest.json already exists" in result["err"], result["err"]
        assert "--overwrite" in result["err"]
    # One process (not two) resuming the two-process run: refused, with the reason, before the model loads.
    from instructor_jax import Instructor

    loads = []
    monkeypatch.setattr(Instructor, "from_pretrained", lambda *a, **k: loads.append(1))
    argv = ["encode", "--model", sharded["model"], "--input", str(root / "big.jsonl"), "--output",
            str(root / "out" / "emb.npy"), "--ids", str(root / "out" / "ids.txt"), "--quiet"]
    for extra in (["--resume"], ["--overwrite"], []):
        with pytest.raises(SystemExit) as exit_:
            cli(argv + extra)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "holds files of a 2-process encode" in err and "Rerun with 2 processes" in err
    assert not loads
    with pytest.raises(ValueError, match="2-process encode .*this run has 3 processes"):
        corpus_shards.check_process_count(root / "out" / "emb.npy", root / "out" / "ids.txt", 3)
    corpus_shards.check_process_count(root / "out" / "emb.npy", root / "out" / "ids.txt", 2)


def test_fewer_lines_than_processes_and_an_empty_input(sharded, relu_instructor):
    root = sharded["root"]
    for name in ("one line", "empty"):
        for result in _result(sharded, name):
            assert result["code"] == 0, result["err"]
    one = open_embeddings(root / "one" / "emb.npy")
    assert one.shape == (1, 16) and one.dtype == embedding_store.store_dtype("bfloat16") and one.ids == ["1"]
    manifest = json.loads((root / "one" / "emb.manifest.json").read_text())
    assert [s["rows"] for s in manifest["shards"]] == [1, 0] and manifest["store_dtype"] == "bfloat16"
    expected = relu_instructor.encode([[INSTRUCTION, "only line"]])
    np.testing.assert_allclose(np.asarray(one, np.float32), expected, atol=4e-3, rtol=0)
    empty = open_embeddings(root / "empty" / "emb.manifest.json")
    assert empty.shape == (0, 16) and empty.ids == []
    assert "holds no texts to encode" in _result(sharded, "empty")[1]["err"]


def test_a_bad_line_stops_both_processes_with_its_global_line_number(sharded):
    mine, theirs = _result(sharded, "bad line")[1], _result(sharded, "bad line")[0]
    assert mine["code"] == theirs["code"] == 2
    assert "bad.jsonl:55: malformed JSON" in mine["err"], mine["err"]
    assert "process 1 of 2 failed: " in theirs["err"] and "bad.jsonl:55: malformed JSON" in theirs["err"], theirs["err"]
    # The other shard was finished: --resume keeps it and encodes the failed one again (skipping its bad line).
    kept, redone = _result(sharded, "bad line skipped on resume")
    assert kept["code"] == redone["code"] == 0, kept["err"] + redone["err"]
    assert "emb-00000-of-00002.npy (finished before, kept)" in kept["out"]
    assert "skipped 1 bad line(s)" in redone["err"] and "finished before" not in redone["out"]
    view = open_embeddings(sharded["root"] / "bad" / "emb.npy")
    assert len(view) == 59 and "55" not in view.ids and view.ids[-1] == "doc-59"
    assert json.loads((sharded["root"] / "bad" / "emb.manifest.json").read_text())["shards"][1]["skipped"] == 1


def test_gs_input_and_output_with_two_processes(sharded, relu_instructor, tmp_path):
    root = sharded["root"]
    for result in _result(sharded, "gs"):
        assert result["code"] == 0, result["err"]
    bucket = root / "gs:" / "bucket"
    assert sorted(p.name for p in (bucket / "out").iterdir()) == [
        "emb-00000-of-00002.npy", "emb-00000-of-00002.npy.json", "emb-00001-of-00002.npy",
        "emb-00001-of-00002.npy.json", "emb.manifest.json", "ids-00000-of-00002.txt", "ids-00001-of-00002.txt"]
    assert not [p for p in (root / "tmp").rglob("*") if p.is_file()]  # every staged copy uploaded and removed
    view = open_embeddings(bucket / "out" / "emb.manifest.json")  # the same files, read locally
    assert view.dtype == np.float16 and len(view) == 40
    encode_corpus(relu_instructor, bucket / "small.jsonl", tmp_path / "one.npy", ids_path=tmp_path / "one.txt",
                  show_progress_bar=False)
    np.testing.assert_allclose(np.asarray(view, np.float32), np.load(tmp_path / "one.npy"), atol=1e-3, rtol=0)
    assert view.ids == (tmp_path / "one.txt").read_text().splitlines()


# ---------------------------------------------------------------------------------------------------------
# Issue 25: a damaged shard, a merge that fails


@pytest.mark.fast
def test_a_shard_cut_short_is_named_with_what_to_do(tmp_path, capsys):
    path = _manifest(tmp_path, [np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)])
    with open(tmp_path / "e-1.npy", "r+b") as f:
        f.truncate(embedding_store.NPY_HEADER_BYTES + 4 * 4)  # one row of two left
    for read in (lambda: open_embeddings(path), lambda: embedding_store.merge(path, tmp_path / "m.npy")):
        with pytest.raises(ValueError, match=r"e-1.npy is damaged or cut short \(.*\): delete it and its completion "
                                             r"file \S+e-1.npy.json, then rerun the encode with --resume"):
            read()
    with pytest.raises(SystemExit) as exit_:
        cli(["encode", "--merge", str(path), str(tmp_path / "m.npy"), "--quiet"])
    assert exit_.value.code == 2 and "e-1.npy is damaged or cut short" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("m.")) == []
    np.save(tmp_path / "one.npy", np.ones((4, 3), np.float32))
    with open(tmp_path / "one.npy", "r+b") as f:
        f.truncate(100)
    with pytest.raises(ValueError, match=r"one.npy is damaged or cut short \(.*\): encode it again"):
        open_embeddings(tmp_path / "one.npy")


@pytest.mark.fast
def test_a_merge_that_fails_leaves_no_partial_files(tmp_path):
    path = _manifest(tmp_path, [np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)])
    (tmp_path / "i-1.txt").write_text("only one id\n")
    with pytest.raises(ValueError, match="the ids files hold 4 ids for 5 rows"):
        embedding_store.merge(path, tmp_path / "out" / "m.npy", tmp_path / "out" / "m.ids")
    assert not list(tmp_path.rglob("*.partial"))


def test_resume_encodes_a_damaged_finished_shard_again(relu_instructor, tmp_path, caplog):
    import logging

    _write_jsonl(tmp_path / "in.jsonl", 12)
    group = ProcessGroup(0, 1, lambda value: [value])
    run = dict(load_model=lambda: relu_instructor, input_path=tmp_path / "in.jsonl",
               output_path=str(tmp_path / "emb.npy"), group=group, show_progress_bar=False)
    first = corpus_shards.encode_sharded(**run)
    shard = pathlib.Path(first.shard)
    whole = shard.read_bytes()
    with open(shard, "r+b") as f:
        f.truncate(len(whole) - 10)
    with caplog.at_level(logging.WARNING):
        again = corpus_shards.encode_sharded(**run, resume=True)
    assert not again.skipped and shard.read_bytes() == whole
    assert any("is damaged" in r.getMessage() and "encoding it again" in r.getMessage() for r in caplog.records)
    assert corpus_shards.encode_sharded(**run, resume=True).skipped  # an intact shard is kept
