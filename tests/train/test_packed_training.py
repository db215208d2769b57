"""Packed training: the loss and gradients of the unpacked step, on meshes and through GradCache; a bounded
number of compiled steps; real tokens/s and padding fraction in metrics.jsonl; every process the same plan."""

import json
import pathlib

import jax
import numpy as np
import pytest

from instructor_jax.train import data, medi
from instructor_jax.model import packing
from instructor_jax.runtime import sharding
from instructor_jax.model.config import HeadConfig
from instructor_jax.model.encoder import InstructorModel, init_boxed_params, init_params
from instructor_jax.reference import TINY_TOKENIZER
from instructor_jax.model.tokenization import InstructionTokenizer
from instructor_jax.train.config import TrainConfig, tiny_encoder
from instructor_jax.train.loop import train
from instructor_jax.train.step import (STAT_KEYS, computed_lengths, make_batch_layout, make_value_and_grad, real_lengths,
                                       row_unit)

SEQ, BATCH = 64, 8  # buckets 16, 32, 64; row lengths 16, 32, 64
WORDS = "the old bridge measures heavy rain near a small river while dogs sleep under bright stars".split()
INSTRUCTIONS = ("Represent the question for retrieval: ", "Represent the passage: ", "")


def _examples(seed: int, n: int, task: str, passage_words=(2, 20), query_words=(1, 6)) -> list:
    """MEDI-shaped triples of varied lengths (~3 tokens a word): short queries, longer passages, of which a
    few fill max_seq_length; instructions of 0 to 12 tokens."""
    rng = np.random.default_rng(seed)

    def pair(words):
        return (INSTRUCTIONS[int(rng.integers(3))], " ".join(rng.choice(WORDS, size=int(rng.integers(*words)))))

    return [medi.Example(pair(query_words), pair(passage_words), (pair(passage_words),), task) for _ in range(n)]


@pytest.fixture(scope="module")
def tokenizer():
    return InstructionTokenizer.from_directory(TINY_TOKENIZER, max_seq_length=SEQ)


@pytest.fixture(scope="module")
def batch(tokenizer):
    batch = data.BatchTokenizer(tokenizer, num_negatives=1, warn_truncation=False)(_examples(0, BATCH, "t"))
    lengths = real_lengths(batch)
    # Real variety: padding, at least two buckets, and not every sequence truncated to max_seq_length.
    assert len({batch[f"{p}_ids"].shape[-1] for p in data.PARTS}) >= 2
    assert lengths.min() < SEQ // 2 and (lengths < SEQ).mean() > 0.5
    return batch


def _loss_and_grads(batch, mesh_shape, loss_mode, chunk):
    """((loss, accuracy), gradients) of one step's batch, unpacked and packed, on a mesh of fake devices."""
    encoder, head = tiny_encoder(), HeadConfig(dense_features=64)
    model = InstructorModel(encoder, head)
    mesh = sharding.make_mesh(mesh_shape)
    cfg = TrainConfig(batch_size=BATCH, max_seq_length=SEQ, loss_mode=loss_mode, grad_cache_chunk_size=chunk)
    packed = data.pack_batch(batch, SEQ, row_unit(mesh, cfg))
    assert len(packed["rows_ids"]) % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    assert len(packed["rows_ids"]) < len(computed_lengths(batch))  # fewer rows than sequences
    params = init_params(encoder, head, seed=1)  # off the mesh: init's dummy batch of one does not split
    with sharding.activate(mesh, cfg.logical_axis_rules):
        shardings = sharding.logical_shardings(jax.eval_shape(lambda k: init_boxed_params(model, k),
                                                              jax.random.PRNGKey(0)), mesh, cfg.logical_axis_rules)
        params = jax.device_put(params, shardings)
        step = jax.jit(make_value_and_grad(model, cfg))
        rng = jax.random.key(0)
        return [jax.device_get(step(params, {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim))
                                             for k, v in b.items()}, rng)) for b in (batch, packed)]


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a),
                                                                                  jax.tree.leaves(b)))


# Each loss mode on each mesh, directly and through GradCache (8 rows a chunk on 8 devices, 4 on 4).
CASES = [((8, 1, 1), "instructor", None), ((8, 1, 1), "in_batch", 8),
         ((2, 2, 2), "in_batch", None), ((2, 2, 2), "instructor", 4)]


@pytest.mark.parametrize("mesh_shape, loss_mode, chunk", CASES, ids=[f"{m}-{l}-chunk{c}" for m, l, c in CASES])
def test_packed_loss_and_gradients_equal_unpacked(batch, mesh_shape, loss_mode, chunk):
    ((loss, accuracy), grads), ((packed_loss, packed_accuracy), packed_grads) = _loss_and_grads(
        batch, mesh_shape, loss_mode, chunk)
    assert abs(float(packed_loss) - float(loss)) < 1e-5  # measured: <= 9.5e-7 (losses ~7)
    assert _max_diff(packed_grads, grads) < 1e-5  # measured: <= 5.4e-7 (largest gradient entries ~0.9)
    assert float(packed_accuracy) == float(accuracy)


def test_auto_packs_varied_batches_and_not_uniform_ones(batch, tokenizer):
    from instructor_jax.model.config import InstructorConfig

    config = InstructorConfig(encoder=tiny_encoder(), head=HeadConfig(dense_features=64), max_seq_length=SEQ)
    layout = make_batch_layout(TrainConfig(batch_size=BATCH, max_seq_length=SEQ), config, 1)
    varied = layout(batch)
    assert "rows_ids" in varied and varied["stat_slots"] < computed_lengths(batch).sum()
    assert varied["stat_real_tokens"] == real_lengths(batch).sum()
    # Every sequence truncated to max_seq_length: one per row either way, so unpacked (no segment pooling).
    uniform = data.BatchTokenizer(tokenizer, 1, warn_truncation=False)(_examples(1, BATCH, "t", (25, 30), (25, 30)))
    assert "rows_ids" not in layout(uniform)
    off = make_batch_layout(TrainConfig(batch_size=BATCH, max_seq_length=SEQ, packing=False), config, 1)
    assert "rows_ids" not in off(batch)


def test_every_process_derives_the_same_plan_and_feeds_its_rows(tokenizer):
    examples = _examples(2, 2 * BATCH, "t")
    transform = lambda b: data.pack_batch(b, SEQ, 4)  # noqa: E731
    whole = data.make_train_dataset(examples, BATCH, tokenizer, 1, transform=transform)[1]
    shares = [data.make_train_dataset(examples, BATCH, tokenizer, 1, process_index=i, process_count=2,
                                      transform=transform)[1] for i in range(2)]
    assert whole.keys() == shares[0].keys()
    for key, value in whole.items():
        np.testing.assert_array_equal(np.concatenate([s[key] for s in shares]), value, err_msg=key)
    assert len(shares[0]["rows_ids"]) * 2 == len(whole["rows_ids"])


def _write_medi(path: pathlib.Path) -> None:
    """Four single-task batches of short passages, four of long ones: rows of 32 and of 64 tokens."""
    examples = [e for t in range(8) for e in _examples(10 + t, BATCH, f"task{t}", (1, 4) if t % 2 else (2, 20))]
    path.write_text("".join(json.dumps({"query": list(e.query), "pos": list(e.pos), "neg": list(e.negs[0]),
                                        "task_name": e.task}) + "\n" for e in examples))


def _step_rows(workdir) -> list:
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Six steps packed and six unpacked, on two devices, of the same varied batches."""
    root = tmp_path_factory.mktemp("runs")
    _write_medi(root / "train.jsonl")
    settings = dict(train_file=str(root / "train.jsonl"), held_out_file=None, batch_size=BATCH, max_seq_length=SEQ,
                    total_steps=6, warmup_steps=1, save_every=1000, log_every=1, peak_flops_per_device=1e11,
                    export=False)
    runs = {}
    for packed in (True, False):
        cfg = TrainConfig(**settings, packing=packed)
        runs[packed] = train(root / str(packed), cfg, devices=jax.devices()[:2]), cfg, root / str(packed)
    return runs


def test_compiled_steps_stay_within_the_bound(runs, tokenizer):
    from instructor_jax.model.config import InstructorConfig

    result, cfg, _ = runs[True]
    mesh = sharding.make_mesh((-1, 1, 1), jax.devices()[:2])
    config = InstructorConfig(encoder=tiny_encoder(), head=cfg.head, max_seq_length=SEQ)
    iterator = data.make_train_iterator(medi.read_medi(cfg.train_file), BATCH, tokenizer, 1,
                                        transform=make_batch_layout(cfg, config, row_unit(mesh, cfg)))
    shapes = {next(iterator)["rows_ids"].shape for _ in range(cfg.total_steps)}
    assert len({length for _, length in shapes}) == 2  # rows of 32 and of 64 tokens: the lengths do vary
    bound = packing.training_program_bound(SEQ, 3 * BATCH, row_unit(mesh, cfg))
    assert result["train_step_programs"] == len(shapes) <= bound  # one program per packed shape, not per step


def test_metrics_report_real_tokens_per_s_and_padding(runs):
    packed, unpacked = (_step_rows(runs[p][2]) for p in (True, False))
    assert [r["step"] for r in packed] == [r["step"] for r in unpacked] == list(range(1, 7))
    for rows in (packed, unpacked):
        for r in rows:
            assert r["real_tokens_per_s"] > 0 and np.isfinite(r["real_tokens_per_s"])
            assert 0 <= r["padding_fraction"] < 1
    # The same batches: packing computes less padding on every step, and gives the same loss (dropout 0).
    assert all(p["padding_fraction"] < u["padding_fraction"] for p, u in zip(packed, unpacked))
    # measured: <= 1.9e-6 over six AdamW steps (losses ~7)
    np.testing.assert_allclose([r["loss"] for r in packed], [r["loss"] for r in unpacked], rtol=0, atol=1e-5)
    assert set(STAT_KEYS).isdisjoint(packed[0])
