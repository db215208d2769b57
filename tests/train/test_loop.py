"""The trainer: one real run, exact resume after kill -9, preemption, NaN, configs, bad workdirs."""

import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import gin
import numpy as np
import pytest

from instructor_jax.train.config import TrainConfig, TrainingError
from instructor_jax.train.loop import train

CONFIGS = sorted((pathlib.Path(__file__).parents[2] / "configs").glob("*.gin"))


# The tiny default, shortened for tests: 8-example batches, 32 tokens, a few steps.
SMALL = dict(batch_size=8, max_seq_length=32, total_steps=8, warmup_steps=2, save_every=4, log_every=1,
             eval_every=1000, peak_flops_per_device=1e11, export=False)


def small(**overrides) -> TrainConfig:
    return TrainConfig(**{**SMALL, **overrides})


def losses(workdir) -> dict:
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_config_loads(path):
    gin.clear_config()
    try:
        gin.parse_config_files_and_bindings([str(path)], [])
        config = TrainConfig().validate()
    finally:
        gin.clear_config()
    header = path.read_text().splitlines()[:4]
    assert any("instructor-jax train --gin_file configs/" + path.name in line for line in header)
    assert config.total_steps > 0


def test_a_short_run_writes_metrics_checkpoints_and_exports(tmp_path):
    from sentence_transformers import SentenceTransformer

    from instructor_jax import Instructor
    from instructor_jax.reference import reference_embeddings

    result = train(tmp_path, small(total_steps=6, export=True, eval_every=3))
    assert result["step"] == 6
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in step_rows] == list(range(1, 7))
    for key in ("loss", "learning_rate", "grad_norm", "examples_per_s", "tokens_per_s", "mfu"):
        assert all(np.isfinite(r[key]) for r in step_rows), key
    assert sum("held_out_accuracy" in r for r in rows) == 3  # before, at step 3, after
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4", "6"]
    assert list((tmp_path / "tensorboard").iterdir())
    # The exported model reloads, and plain sentence-transformers reproduces it.
    model = Instructor.from_pretrained(tmp_path / "model")
    pairs = [["Represent the sentence for retrieval: ", "a small dog follows the river"], ["", "heavy rain"]]
    exported = SentenceTransformer(str(tmp_path / "sentence_transformers"), device="cpu")
    assert np.abs(reference_embeddings(exported, pairs) - model.encode(pairs)).max() < 1e-5


DRIVER = textwrap.dedent("""
    import sys, time
    import instructor_jax.train.data as data
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.loop import train

    real = data.make_train_iterator
    def make(*args, **kwargs):
        iterator, served = real(*args, **kwargs), [0]
        class Slow:
            def __next__(self):
                served[0] += 1
                if served[0] > {hang_after}:
                    time.sleep(3600)  # hang here until the test kills us
                time.sleep({delay})
                return next(iterator)
            get_state, set_state = iterator.get_state, iterator.set_state
        return Slow()
    data.make_train_iterator = make
    if {cli}:  # as `instructor-jax train --workdir W --gin_bindings ...`: its exit status is the command's
        from instructor_jax.cli import main
        main(["train", "--workdir", sys.argv[1]]
             + [a for k, v in {settings}.items() for a in ("--gin_bindings", f"TrainConfig.{{k}} = {{v!r}}")])
    else:
        train(sys.argv[1], TrainConfig(**{settings}))
""")


def _launch(workdir, hang_after=10 ** 9, delay=0.0, cli=False, **overrides):
    script = DRIVER.format(hang_after=hang_after, delay=delay, cli=cli, settings={**SMALL, **overrides})
    return subprocess.Popen([sys.executable, "-c", script, str(workdir)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(condition, process, timeout=240):
    deadline = time.time() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the training process ended early:\n{process.stdout.read()}")
        if time.time() > deadline:
            process.kill()
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_resume_after_kill_9_gives_the_same_losses(tmp_path):
    straight = tmp_path / "straight"
    train(straight, small())
    interrupted = tmp_path / "interrupted"
    # Steps 5 and 6 run past the checkpoint of step 4, then the process hangs and is killed.
    process = _launch(interrupted, hang_after=6)
    _wait_for(lambda: (interrupted / "checkpoints" / "4").is_dir() and len(losses(interrupted)) >= 6, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert max(losses(interrupted)) == 6
    train(interrupted, small())
    assert losses(interrupted) == losses(straight)  # bitwise: same programs, same inputs, same keys


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    """`instructor-jax train` stopped by SIGTERM saves, then exits 128 + 15 (issue 25: it exited 0, so that
    `train && next` went on after a preemption); the run resumes from the checkpoint."""
    process = _launch(tmp_path, delay=0.3, cli=True, total_steps=40, save_every=100)
    _wait_for(lambda: (tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 3, process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 143, output
    assert "preempted: saved the checkpoint of step" in output
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and max(saved) >= 3
    # Ended early on purpose: total_steps changes (the schedule with it), which a resume must accept.
    result = train(tmp_path, small(total_steps=max(saved) + 2, save_every=100, accept_changed_settings=True))
    assert result["step"] == max(saved) + 2


def test_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    train(tmp_path, small(total_steps=4, save_every=2))
    with pytest.raises(TrainingError, match="at step 5; stopping. The last good checkpoint \\(step 4\\) is intact"):
        train(tmp_path, small(total_steps=8, save_every=1, learning_rate=1e38, warmup_steps=0,
                              accept_changed_settings=True))
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == [2, 4]
    # The run resumes from that checkpoint once the cause is fixed.
    assert train(tmp_path, small(total_steps=5, accept_changed_settings=True))["step"] == 5


def test_unwritable_workdir_fails_before_any_compute(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write to the workdir"):
        train(blocker / "run", small())


def test_conflicting_and_bad_settings():
    from instructor_jax.model.config import EncoderConfig

    with pytest.raises(ValueError, match="both init_from and encoder are set"):
        small(init_from="x", encoder=EncoderConfig()).validate()
    with pytest.raises(ValueError, match="loss_mode must be one of"):
        small(loss_mode="triplet").validate()
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        small(warmup_steps=100).validate()
    with pytest.raises(ValueError, match="prng_impl must be one of"):
        small(prng_impl="philox").validate()


def test_each_prng_impl_draws_reproducible_dropout():
    """The step's dropout masks come from the configured generator, the same for the same step."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from instructor_jax.model.config import HeadConfig
    from instructor_jax.model.encoder import InstructorModel, init_params
    from instructor_jax.train.config import tiny_encoder
    from instructor_jax.train.step import make_optimizer, make_train_step

    encoder, head = dataclasses.replace(tiny_encoder(), dropout_rate=0.2), HeadConfig(dense_features=64)
    params = init_params(encoder, head)
    rng = np.random.default_rng(0)
    batch = {f"{p}_{k}": rng.integers(3, 300, size=lead + (16,)).astype(np.int32) if k == "ids"
             else np.ones(lead + (16,), np.int32) if k == "mask" else np.ones(lead, np.int32)
             for p, lead in (("query", (8,)), ("pos", (8,)), ("neg", (8, 1)))
             for k in ("ids", "mask", "instruction_lengths")}
    losses = {}
    for impl in ("threefry2x32", "rbg", "unsafe_rbg"):
        cfg = small(prng_impl=impl)
        tx, schedule = make_optimizer(cfg)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
        step = jax.jit(make_train_step(InstructorModel(encoder, head), tx, schedule, cfg))
        losses[impl] = [float(step(state, batch)[1]["loss"]) for _ in range(2)]
        assert losses[impl][0] == losses[impl][1], impl
    assert len({v[0] for v in losses.values()}) == 3, losses  # three generators, three sets of masks


def test_init_from_a_pytorch_checkpoint(relu_reference, tmp_path):
    """The run starts from the checkpoint's weights, by value: at learning rate 0 the parameters after two
    steps are exactly the converted ones (AdamW's update is lr times something, so exactly zero)."""
    import jax

    from instructor_jax.checkpoints import convert, tensor_table

    result = train(tmp_path, small(init_from=str(relu_reference[0]), total_steps=2, save_every=2,
                                   learning_rate=0.0))
    assert result["step"] == 2 and np.isfinite(losses(tmp_path)[2])
    _, expected = convert.read_sentence_transformers(relu_reference[0])
    got = tensor_table.flatten_params(jax.device_get(result["params"]))
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_trains_from_an_array_record_file(tmp_path):
    from instructor_jax.train import data, medi

    examples = medi.read_medi(TrainConfig().train_file)
    medi.write_array_record(examples, tmp_path / "medi.array_record")
    assert isinstance(data.open_examples(tmp_path / "medi.array_record"), medi.MediArrayRecordSource)
    result = train(tmp_path / "run", small(train_file=str(tmp_path / "medi.array_record"), total_steps=2))
    assert result["step"] == 2 and np.isfinite(losses(tmp_path / "run")[2])


def test_checkpoints_elsewhere(tmp_path):
    elsewhere = tmp_path / "bucket" / "ckpt"
    train(str(tmp_path / "run"), small(total_steps=2, save_every=2, checkpoint_dir=str(elsewhere)))  # str workdir
    assert (elsewhere / "2").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    assert train(tmp_path / "run", small(total_steps=3, checkpoint_dir=str(elsewhere),
                                         accept_changed_settings=True))["step"] == 3  # resumes


def test_a_gs_workdir_gets_logs_and_exports_and_resumes(tmp_path, monkeypatch):
    """gs:// through etils.epath, faked: epath's mock backend maps gs://bucket/... onto ./gs:/bucket/...
    (tensorstore, which writes orbax's arrays, has no such fake, so the checkpoints stay local here)."""
    import shutil

    from etils.epath import testing as epath_testing

    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "gs:" / "bucket"
    bucket.mkdir(parents=True)
    shutil.copy(TrainConfig().train_file, bucket / "train.jsonl")
    settings = dict(checkpoint_dir=str(tmp_path / "ckpt"), train_file="gs://bucket/train.jsonl", save_every=2)
    with epath_testing.mock_epath():
        assert train("gs://bucket/run", small(total_steps=2, **settings))["step"] == 2
        remote = bucket / "run"
        assert sorted(losses(remote)) == [1, 2] and (remote / "config.gin").is_file()
        assert list((remote / "tensorboard").glob("events.out.tfevents.*"))
        assert not any(p.name.startswith(".") for p in remote.rglob("*"))  # no staging copies uploaded
        result = train("gs://bucket/run", small(total_steps=3, export=True, accept_changed_settings=True,
                                                **settings))  # resumes at step 2
    assert result["step"] == 3 and sorted(losses(remote)) == [1, 2, 3]
    from instructor_jax import Instructor

    exported = Instructor.from_pretrained(remote / "model").encode([["Represent the sentence: ", "a red bridge"]])
    assert exported.shape == (1, 64) and (remote / "sentence_transformers" / "modules.json").is_file()

    def no_credentials(original, path):
        raise OSError("Anonymous caller does not have storage.objects.get access")

    with epath_testing.mock_epath(exists=no_credentials), \
            pytest.raises(OSError, match=r"cannot use the workdir gs://other/run.*instructor-jax\[gcs\]"):
        train("gs://other/run", small())


def test_resuming_with_another_parameter_layout_says_why(tmp_path):
    train(tmp_path, small(total_steps=2, save_every=2))
    with pytest.raises(ValueError, match=r"checkpoint of step 2 .* does not fit this run's model .*scan_layers"):
        train(tmp_path, small(total_steps=2, scan_layers=True))


# --- issue 13: locks, exports only over our own, Ctrl-C, damaged checkpoints, gin fields ------------------

def test_a_second_run_on_a_workdir_is_refused(tmp_path):
    import os
    import socket

    from instructor_jax.runtime.locks import LockedError

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".instructor-jax.lock").write_text(json.dumps(
            {"pid": sleeper.pid, "host": socket.gethostname(), "started": 0, "command": "instructor-jax train"}))
        with pytest.raises(LockedError, match=f"the workdir .* is in use by PID {sleeper.pid} on host"):
            train(tmp_path, small())
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    assert os.getpid() != sleeper.pid


def test_exports_never_replace_a_directory_that_is_not_ours(tmp_path):
    from instructor_jax.runtime.fileio import RefusedOverwrite

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "__init__.py").write_text("# a Python package")
    with pytest.raises(RefusedOverwrite, match="model: it has no instructor_jax.json.*TrainConfig.export = False"):
        train(tmp_path, small(export=True))
    assert (tmp_path / "model" / "__init__.py").exists() and not (tmp_path / "checkpoints").exists()


def test_ctrl_c_saves_the_current_step_and_exits_130(tmp_path, monkeypatch, capsys):
    import os

    from instructor_jax.train import data
    from instructor_jax.cli import main as cli

    real = data.make_train_iterator

    def make(*args, **kwargs):
        iterator, served = real(*args, **kwargs), [0]

        class CtrlCAfterThree:
            def __next__(self):
                served[0] += 1
                if served[0] == 4:
                    os.kill(os.getpid(), signal.SIGINT)  # while step 4 runs
                return next(iterator)

            get_state, set_state = iterator.get_state, iterator.set_state
        return CtrlCAfterThree()

    monkeypatch.setattr(data, "make_train_iterator", make)
    settings = {**SMALL, "total_steps": 40, "save_every": 100, "held_out_file": None}
    bindings = [f"TrainConfig.{k} = {v!r}" for k, v in settings.items()]
    gin.clear_config()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli(["train", "--workdir", str(tmp_path), *sum((["--gin_bindings", b] for b in bindings), [])])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert exit_.value.code == 130 and "Traceback" not in err, err
    assert "interrupted: saved the checkpoint of step 4 in" in err and "rerun the same command to resume" in err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["4"]
    assert not (tmp_path / ".instructor-jax.lock").exists()


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    """Restore alone, on a small state: what matters is which checkpoint is taken and what is kept."""
    import jax
    import orbax.checkpoint as ocp

    from instructor_jax.train.state import restore_newest_good

    state = {"w": np.arange(4096, dtype=np.float32), "step": np.int32(0)}
    manager = ocp.CheckpointManager(tmp_path, options=ocp.CheckpointManagerOptions(create=True))
    for step in (1, 2):
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({**state, "step": np.int32(step)}),
                                                   data=ocp.args.JsonSave({"position": step})))
    manager.wait_until_finished()
    biggest = max((p for p in (tmp_path / "2" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:biggest.stat().st_size // 2])  # a torn write
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), state)
    step, restored = restore_newest_good(manager, target, tmp_path)
    assert step == 1 and restored["data"] == {"position": 1} and int(restored["state"]["step"]) == 1
    assert "the checkpoint of step 2 in" in caplog.text and "cannot be restored" in caplog.text
    assert "falling back to the checkpoint of step 1" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.damaged"]  # kept, not deleted
    assert manager.all_steps() == [1]
    (tmp_path / "1" / "data" / "metadata").write_text("{not json")
    with pytest.raises(TrainingError, match="no checkpoint in .* can be restored \\(step 1: "):
        restore_newest_good(manager, target, tmp_path)
    manager.close()


@pytest.mark.parametrize("binding, message", [
    ("TrainConfig.batch_size = 'x'", "TrainConfig.batch_size must be an integer, got 'x' \\(str\\)"),
    ("TrainConfig.learning_rate = 'x'", "TrainConfig.learning_rate must be a number, got 'x'"),
    ("TrainConfig.adam_b2 = 1.5", "TrainConfig.adam_b2 must be in \\[0, 1\\)"),
    ("TrainConfig.dtype = 'float16'", "TrainConfig.dtype must be 'float32' or 'bfloat16'"),
    ("TrainConfig.batch_size = = 3", "cannot parse the gin configuration"),
])
def test_gin_fields_are_checked_by_name_before_any_compute(tmp_path, capsys, binding, message):
    import re

    from instructor_jax.cli import main as cli

    gin.clear_config()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli(["train", "--workdir", str(tmp_path / "run"), "--gin_bindings", binding])
    finally:
        gin.clear_config()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err
    assert not (tmp_path / "run").exists()


# --- issue 25: misuse ---------------------------------------------------------------------------------------------

def test_a_bad_training_record_names_the_training_setting_that_skips_it(tmp_path):
    (tmp_path / "medi.jsonl").write_text('{"query": ["Represent: ", "a"]}\n')
    with pytest.raises(ValueError, match=r"medi.jsonl: record 0 \(line 1\): missing key 'pos'.*set "
                                         r"TrainConfig.skip_bad_records = True") as error:
        train(tmp_path / "w", small(train_file=str(tmp_path / "medi.jsonl"), held_out_file=None))
    assert "skip_bad=True" not in str(error.value)


@pytest.mark.fast
def test_a_batch_that_does_not_split_over_the_devices_is_refused_before_the_workdir(tmp_path):
    import jax

    with pytest.raises(ValueError, match=r"batch_size=6 does not split over the 4 devices of the batch axis \(mesh "
                                         r"data x fsdp = 4 x 1\): choose a multiple of 4, such as 4 or 8"):
        train(tmp_path / "w", small(batch_size=6, mesh_shape=(-1, 1, 1)), devices=jax.devices()[:4])
    assert not (tmp_path / "w").exists()


def test_resuming_with_changed_settings_is_refused_and_config_gin_kept(tmp_path):
    import jax

    from instructor_jax.train.workdir import ChangedSettings

    def run(**settings):  # one device, no held-out evaluation: the fewest compiles
        base = dict(total_steps=1, save_every=1, warmup_steps=1, held_out_file=None)
        return train(tmp_path, small(**{**base, **settings}), devices=jax.devices()[:1])

    run()
    kept = {name: (tmp_path / name).read_bytes() for name in ("config.gin", "train_config.json")}
    with pytest.raises(ChangedSettings, match=r"holds checkpoints up to step 1, trained with other settings than this "
                                              r"run's: learning_rate 0.003 -> 0.001; total_steps 1 -> 2\. .*bind "
                                              r"TrainConfig.accept_changed_settings = True"):
        run(total_steps=2, learning_rate=1e-3)
    assert {name: (tmp_path / name).read_bytes() for name in kept} == kept and max(losses(tmp_path)) == 1


@pytest.mark.fast
def test_settings_that_do_not_change_the_steps_trained_may_change_on_resume(tmp_path):
    from instructor_jax.train.workdir import ChangedSettings, record_settings

    record_settings(tmp_path, small(), None)
    record_settings(tmp_path, small(log_every=5, eval_every=7, save_every=3, export=True, packing=True,
                                    mesh_shape=(2, -1, 1), keep_checkpoints=9, grad_cache_chunk_size=4), 4)
    for changed in (dict(batch_size=16), dict(warmup_steps=3), dict(seed=1), dict(train_file="other.jsonl"),
                    dict(max_seq_length=48), dict(temperature=0.1)):
        with pytest.raises(ChangedSettings, match=f"up to step 4, .*: {next(iter(changed))} "):
            record_settings(tmp_path, small(**changed), 4)
    # A record written before EncoderConfig gained a field (attention, say) describes the same steps.
    from instructor_jax.train.config import tiny_encoder

    older = tmp_path / "older"
    older.mkdir()
    record_settings(older, small(encoder=tiny_encoder()), None)
    record = json.loads((older / "train_config.json").read_text())
    for name in ("attention", "attention_dropout_rate", "fused_qkv", "bfloat16_elementwise"):
        del record["encoder"][name]
    (older / "train_config.json").write_text(json.dumps(record))
    record_settings(older, small(encoder=tiny_encoder()), 4)
    # Accepted: the files that describe steps 1-4 are kept beside the new ones, and a second accepted change
    # at the same step (the first attempt failed, say) keeps them as they were.
    kept = {name: (tmp_path / name).read_bytes() for name in ("config.gin", "train_config.json")}
    record_settings(tmp_path, small(total_steps=9, accept_changed_settings=True), 4)
    record_settings(tmp_path, small(total_steps=10, accept_changed_settings=True), 4)
    assert (tmp_path / "config.gin.before_step_4").read_bytes() == kept["config.gin"]
    assert (tmp_path / "train_config.json.before_step_4").read_bytes() == kept["train_config.json"]
    assert (tmp_path / "config.gin").read_text().startswith("# steps up to 4 were trained with other settings")
    assert json.loads((tmp_path / "train_config.json").read_text())["total_steps"] == 10
