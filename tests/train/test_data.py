"""MEDI reading, single-task batching, tokenized batches and the resumable, per-process grain pipeline."""

import json
import logging
import pathlib

import grain
import numpy as np
import pytest

from instructor_jax.train import data, medi
from instructor_jax.train.medi import Example
from instructor_jax.reference import TINY_TOKENIZER
from instructor_jax.model.tokenization import InstructionTokenizer

SAMPLE = pathlib.Path(data.__file__).parents[1] / "assets" / "medi_sample"
INSTRUCTION = "Represent the news sentence for retrieval: "


@pytest.fixture(scope="module")
def tokenizer():
    return InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=64)


def record(task="t", text="The river moves heavy rain.", neg=None, **overrides):
    out = {"query": [INSTRUCTION, text], "pos": [INSTRUCTION, text + " Yes."],
           "neg": neg if neg is not None else [INSTRUCTION, "No."], "task_name": task}
    out.update(overrides)
    return out


def write(path, records, jsonl=None):
    path = pathlib.Path(path)
    if jsonl if jsonl is not None else path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    else:
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def examples(tasks: dict[str, int], negs: int = 1) -> list[Example]:
    """Synthetic examples, task by task; texts name their task and index."""
    return [Example((INSTRUCTION, f"{task} query {i}."), (INSTRUCTION, f"{task} positive {i}."),
                    tuple((INSTRUCTION, f"{task} negative {i} {k}.") for k in range(negs)), task)
            for task, count in tasks.items() for i in range(count)]


# --- reading -------------------------------------------------------------------------------------------


def test_json_list_and_jsonl_read_alike(tmp_path):
    records = [record("a"), record("b", neg=[[INSTRUCTION, "n1"], [INSTRUCTION, "n2"]]),
               {k: v for k, v in record().items() if k != "task_name"} | {"task_id": 7}]
    from_json = medi.read_medi(write(tmp_path / "medi.json", records))
    from_jsonl = medi.read_medi(write(tmp_path / "medi.jsonl", records))
    assert from_json == from_jsonl
    assert [e.task for e in from_json] == ["a", "b", "7"]  # task_name, or task_id as a string
    assert from_json[0].negs == ((INSTRUCTION, "No."),)
    assert from_json[1].negs == ((INSTRUCTION, "n1"), (INSTRUCTION, "n2"))
    assert from_json[0].query == (INSTRUCTION, "The river moves heavy rain.")
    # A .json file holding JSON Lines is recognised by its content.
    assert medi.read_medi(write(tmp_path / "lines.json", records, jsonl=True)) == from_json


BAD_RECORDS = [
    (lambda r: r.pop("pos"), "missing key 'pos'"),
    (lambda r: r.pop("task_name"), "missing key 'task_id'"),
    (lambda r: r.update(query="just text"), "query is a str, not an \\[instruction, text\\] pair"),
    (lambda r: r.update(pos=[INSTRUCTION, "a", "b"]), "pos has 3 elements, not 2"),
    (lambda r: r.update(query=[INSTRUCTION, 5]), "the text of query is a int"),
    (lambda r: r.update(neg=[[INSTRUCTION, "a"], [None, "b"]]), "the instruction of neg\\[1\\] is a NoneType"),
    (lambda r: r.update(neg=7), "neg is neither"),
    (lambda r: r.update(task_name=3), "task_name is a int"),
    (lambda r: r.update(task_id=True), "task_id is a bool"),
]


@pytest.mark.parametrize("corrupt, message", BAD_RECORDS)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_malformed_records_are_named_by_index(tmp_path, corrupt, message, suffix):
    records = [record(), record(), record()]
    corrupt(records[1])
    path = write(tmp_path / f"medi{suffix}", records)
    with pytest.raises(ValueError, match=f"record 1.*{message}.*skip_bad=True") as error:
        medi.read_medi(path)
    assert str(path) in str(error.value)


def test_skip_bad_counts_the_skipped_records(tmp_path, caplog):
    records = [record(), record(), "not an object", record(), record()]
    records[1].pop("query")
    records[3]["pos"] = ["only one"]
    path = write(tmp_path / "medi.json", records)
    with caplog.at_level(logging.WARNING):
        assert len(medi.read_medi(path, skip_bad=True)) == 2
    assert "skipped 3 malformed records (the first: record 1: missing key 'query')" in caplog.text


def test_invalid_json_gives_the_line(tmp_path):
    path = tmp_path / "medi.jsonl"
    path.write_text(json.dumps(record()) + "\n\n" + '{"query": [\n' + json.dumps(record()) + "\n")
    with pytest.raises(ValueError, match="record 1 \\(line 3\\): invalid JSON"):
        medi.read_medi(path)
    assert len(medi.read_medi(path, skip_bad=True)) == 2
    broken = tmp_path / "medi.json"
    broken.write_text("[\n" + json.dumps(record()) + ",\n{oops}\n]")
    with pytest.raises(ValueError, match="invalid JSON at line 3"):
        medi.read_medi(broken)


def test_non_utf8_bytes_get_a_clear_error(tmp_path):
    path = tmp_path / "medi.jsonl"
    latin1 = json.dumps(record("caf\xe9"), ensure_ascii=False).encode("latin-1")
    path.write_bytes(json.dumps(record()).encode() + b"\n" + latin1)
    with pytest.raises(ValueError, match="line 2\\) is not valid UTF-8.*iconv"):
        medi.read_medi(path)


def test_instructions_without_represent_warn_once_with_a_count(tmp_path, caplog):
    records = [record() for _ in range(5)]
    for r in records[:3]:
        r["query"][0] = "Embed this: "
    with caplog.at_level(logging.WARNING):
        medi.read_medi(write(tmp_path / "medi.jsonl", records))
    warnings = [r for r in caplog.records if "Represent " in r.getMessage()]
    assert len(warnings) == 1
    assert "3 of 5 records have an instruction that does not start with 'Represent '" in warnings[0].getMessage()


def test_bundled_sample_reads_cleanly(caplog):
    with caplog.at_level(logging.WARNING):
        train = medi.read_medi(SAMPLE / "train.jsonl")
        held_out = medi.read_medi(SAMPLE / "held_out.jsonl")
    assert not caplog.records
    assert len({e.task for e in train}) >= 3 and {e.task for e in held_out} == {e.task for e in train}
    texts = lambda examples: {p[1] for e in examples for p in (e.query, e.pos, *e.negs)}  # noqa: E731
    assert not texts(train) & texts(held_out)


def test_array_record_round_trip(tmp_path):
    pytest.importorskip("array_record")
    train = medi.read_medi(SAMPLE / "train.jsonl")[::7]
    medi.write_array_record(train, tmp_path / "medi.array_record")
    source = medi.MediArrayRecordSource(tmp_path / "medi.array_record")
    assert len(source) == len(train) and source[3] == train[3] and source.tasks == [e.task for e in train]
    assert [c.tolist() for c in data.single_task_batches(source, 8, 1)] == \
           [c.tolist() for c in data.single_task_batches(train, 8, 1)]
    (tmp_path / "medi.array_record.tasks.json").unlink()  # without the index, the tasks are read
    assert medi.MediArrayRecordSource(tmp_path / "medi.array_record").tasks == source.tasks


# --- single-task batches -------------------------------------------------------------------------------


def test_single_task_batches_are_full_single_task_and_seeded(caplog):
    ex = examples({"a": 20, "b": 3, "c": 17, "d": 9})
    with caplog.at_level(logging.WARNING):
        batches = data.single_task_batches(ex, 8, seed=0)
    assert "1 of 4 tasks have fewer than batch_size=8 examples and are dropped: b" in caplog.text
    assert len(batches) == 2 + 2 + 1
    for batch in batches:
        assert batch.shape == (8,) and len({ex[i].task for i in batch}) == 1
        assert np.all(np.diff(batch) > 0)  # file order inside a batch
    same = data.single_task_batches(ex, 8, seed=0)
    assert [b.tolist() for b in batches] == [b.tolist() for b in same]
    orders = {tuple(b[0] for b in data.single_task_batches(ex, 8, seed=s)) for s in range(6)}
    assert len(orders) > 1
    # The remainder of each task is dropped: a's last 4, c's last 1, d's last 1.
    assert sorted(i for b in batches for i in b) == list(range(16)) + list(range(23, 39)) + list(range(40, 48))


def test_interleaved_tasks_are_grouped_by_first_appearance():
    ex = [e for pair in zip(examples({"a": 8}), examples({"b": 8})) for e in pair]
    chunks = data.task_chunks([e.task for e in ex], 8)
    assert [c.tolist() for c in chunks] == [list(range(0, 16, 2)), list(range(1, 16, 2))]


# --- tokenized batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, 1, 2])
def test_batch_shapes_dtypes_and_buckets(tokenizer, k):
    ex = examples({"a": 4}, negs=2)
    ex[0] = Example(ex[0].query, (INSTRUCTION, "word " * 30), ex[0].negs, "a")  # a long positive
    batch = data.BatchTokenizer(tokenizer, num_negatives=k)(ex)
    assert all(v.dtype == np.int32 for v in batch.values())
    lq, lp = batch["query_ids"].shape[1], batch["pos_ids"].shape[1]
    assert batch["query_ids"].shape == batch["query_mask"].shape == (4, lq)
    assert batch["pos_ids"].shape == (4, lp) and batch["pos_instruction_lengths"].shape == (4,)
    assert batch["neg_ids"].shape[:2] == batch["neg_mask"].shape[:2] == (4, k)
    assert batch["neg_instruction_lengths"].shape == (4, k)
    buckets = (16, 32, 64)
    for name in ("query", "pos", "neg"):
        mask = batch[f"{name}_mask"]
        assert mask.shape[-1] in buckets
        if mask.size:  # the smallest bucket that holds the longest sequence
            longest = mask.sum(-1).max()
            assert mask.shape[-1] == min(b for b in buckets if b >= longest)
            assert np.all(batch[f"{name}_ids"][mask == 0] == 0)
    assert lq == 32 and lp == 64  # the long positive does not pad the queries
    expected = tokenizer.tokenize([e.pos for e in ex])
    assert batch["pos_instruction_lengths"].tolist() == expected.instruction_lengths.tolist()
    assert batch["pos_ids"][1, :len(expected.input_ids[1])].tolist() == expected.input_ids[1].tolist()
    if k:
        negs = tokenizer.tokenize([ex[2].negs[k - 1]])
        assert batch["neg_ids"][2, k - 1, :len(negs.input_ids[0])].tolist() == negs.input_ids[0].tolist()


def test_too_few_negatives_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="has 1 hard negatives but num_negatives=2"):
        data.BatchTokenizer(tokenizer, num_negatives=2)(examples({"a": 2}, negs=1))
    with pytest.raises(ValueError, match="16 examples have fewer than num_negatives=2"):
        data.make_train_iterator(examples({"a": 16}), 8, tokenizer, num_negatives=2)


def test_held_out_batches_are_in_order_and_truncation_warns_once(caplog):
    short = InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=16)
    ex = examples({"a": 10, "b": 8})
    with caplog.at_level(logging.WARNING):
        batches = data.held_out_batches(ex, 4, short, num_negatives=1)
    truncation = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(truncation) == 1 and "48 of 48 held-out sequences" in truncation[0].getMessage()
    assert len(batches) == 2 + 2
    first = data.BatchTokenizer(short, 1, warn_truncation=False)(ex[:4])
    assert all(np.array_equal(first[key], batches[0][key]) for key in first)


def test_training_truncation_warns_at_powers_of_two(caplog):
    short = InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=16)
    batcher = data.BatchTokenizer(short)
    with caplog.at_level(logging.WARNING):
        for _ in range(5):  # 8 truncated sequences per call: 8, 16, 24, 32, 40 so far
            batcher(examples({"a": 4}))
    messages = [r.getMessage() for r in caplog.records]
    assert [m.split(" sequences")[0] for m in messages] == ["4 of 4", "8 of 8", "16 of 16", "32 of 32"]


# --- the training iterator -----------------------------------------------------------------------------


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_epochs_follow_single_task_batches_with_seed_plus_epoch(tokenizer):
    ex = examples({"a": 24, "b": 16})  # 5 batches of 8 per epoch
    dataset = data.make_train_dataset(ex, 8, tokenizer, seed=3)
    batcher = data.BatchTokenizer(tokenizer)
    expected = [batcher([ex[i] for i in chunk]) for epoch in range(3)
                for chunk in data.single_task_batches(ex, 8, seed=3 + epoch)]
    assert_same_batches([dataset[step] for step in range(15)], expected)
    finite = data.make_train_iterator(ex, 8, tokenizer, seed=3, num_epochs=2)
    assert_same_batches(list(finite), expected[:10])


@pytest.mark.parametrize("stop", [3, 8])  # 8: the 5 batches read after the restore cross into epoch 2
def test_state_restores_to_identical_batches(tokenizer, stop):
    ex = examples({"a": 24, "b": 16, "c": 9}, negs=1)  # 6 batches of 8 per epoch
    iterator = data.make_train_iterator(ex, 8, tokenizer, num_negatives=1, seed=5)
    take(iterator, stop)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint keeps
    expected = take(iterator, 5)
    restored = data.make_train_iterator(ex, 8, tokenizer, num_negatives=1, seed=5)
    take(restored, 2)  # wherever it stood, set_state moves it
    restored.set_state(state)
    assert_same_batches(take(restored, 5), expected)


def test_state_from_another_pipeline_is_refused(tokenizer, tmp_path):
    ex = examples({"a": 16})
    iterator = data.make_train_iterator(ex, 8, tokenizer, seed=0)
    next(iterator)
    data.save_iterator_state(iterator, tmp_path / "state.json")
    with pytest.raises(ValueError, match="saved by a pipeline with .*'seed': 0.*this one has .*'seed': 1"):
        data.restore_iterator_state(data.make_train_iterator(ex, 8, tokenizer, seed=1), tmp_path / "state.json")
    same = data.restore_iterator_state(data.make_train_iterator(ex, 8, tokenizer, seed=0), tmp_path / "state.json")
    assert_same_batches([next(same)], [next(iterator)])


def test_orbax_saves_and_restores_the_iterator(tokenizer, tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    ex = examples({"a": 24, "b": 16})
    iterator = data.make_train_iterator(ex, 8, tokenizer, seed=0)
    take(iterator, 4)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 3)
        restored = data.make_train_iterator(ex, 8, tokenizer, seed=0)
        manager.restore(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same_batches(take(restored, 3), expected)


def test_processes_split_each_global_batch_by_rows(tokenizer):
    ex = examples({"a": 24, "b": 16, "c": 8}, negs=2)
    make = lambda **kw: data.make_train_iterator(ex, 8, tokenizer, num_negatives=2, seed=1, **kw)  # noqa: E731
    whole, first, second = make(), make(process_index=0, process_count=2), make(process_index=1, process_count=2)
    for _ in range(8):  # past the end of the first epoch
        full, a, b = next(whole), next(first), next(second)
        for key in full:
            assert a[key].shape[0] == b[key].shape[0] == 4
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), full[key], err_msg=key)
    with pytest.raises(ValueError, match="batch_size=8 must be divisible by process_count=3"):
        make(process_index=0, process_count=3)
    with pytest.raises(ValueError, match="process_index=2 is not in"):
        make(process_index=2, process_count=2)


def test_no_full_batch_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="no task has batch_size=8 examples"):
        data.make_train_iterator(examples({"a": 7, "b": 5}), 8, tokenizer)


def test_urls_read_json_through_epath_and_refuse_array_record():
    from etils.epath import testing as epath_testing

    with pytest.raises(ValueError, match="ArrayRecord files are read from local paths only"):
        data.open_examples("gs://bucket/medi.array_record")

    def offline(original, path, mode="r"):
        raise ConnectionError("no route to storage.googleapis.com")

    with epath_testing.mock_epath(open=offline), pytest.raises(OSError, match=r"cannot read gs://bucket/medi.json.*gcsfs"):
        medi.read_medi("gs://bucket/medi.json")


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

@pytest.mark.fast
def test_jsonl_strings_may_hold_raw_unicode_line_separators(tmp_path):
    """Valid JSON (json.dumps(..., ensure_ascii=False) writes U+2028, U+2029 and U+0085 raw): one record a
    "\\n"-ended line, whatever a string holds."""
    texts = ["one\u2028two", "para\u2029graph", "next\x85line", "form\x0cfeed"]
    path = tmp_path / "medi.jsonl"
    path.write_text("".join(json.dumps(record(text=t), ensure_ascii=False) + "\n" for t in texts), encoding="utf-8")
    assert [e.query[1] for e in medi.read_medi(path)] == texts
    path.write_text(path.read_text(encoding="utf-8") + "{oops}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="record 4 \\(line 5\\): invalid JSON"):
        medi.read_medi(path)


@pytest.mark.fast
def test_a_lone_surrogate_is_a_malformed_record(tmp_path):
    path = tmp_path / "medi.jsonl"
    path.write_text(json.dumps(record()) + "\n" + json.dumps(record(text="half \ud83d")) + "\n")
    with pytest.raises(ValueError, match=r"record 1 \(line 2\): the text of query holds a lone surrogate"):
        medi.read_medi(path)
    assert len(medi.read_medi(path, skip_bad=True)) == 1
