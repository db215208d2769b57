"""Multi-process start-up: where the settings come from, and two processes training like one."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from instructor_jax.runtime import distributed
from instructor_jax.cli import build_parser, main
from tests.conftest import xla_flags

REPO = pathlib.Path(__file__).parents[2]
COORD = "10.0.0.1:1234"
SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "node[001-004]", "SLURM_NTASKS": "4",
         "SLURM_PROCID": "2", "SLURM_LOCALID": "0"}


def resolve(*args, env=None, tpu=False, **kwargs):
    return distributed.resolve(*args, environ=env or {}, on_tpu_vm=tpu, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Settings resolution (nothing is initialized)


def test_no_settings_is_a_single_process():
    plan = resolve()
    assert plan.mode == "single" and plan.num_processes is None


def test_flags():
    plan = resolve(COORD, 4, 3)
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == ("explicit", COORD, 4, 3)
    assert "--num_processes" in plan.source


def test_environment_variables():
    env = {distributed.ENV_COORDINATOR_ADDRESS: COORD, distributed.ENV_NUM_PROCESSES: "4",
           distributed.ENV_PROCESS_ID: "0"}
    plan = resolve(env=env)
    assert (plan.mode, plan.coordinator_address, plan.num_processes, plan.process_id) == ("explicit", COORD, 4, 0)
    assert "$INSTRUCTOR_JAX_PROCESS_ID" in plan.source


def test_flags_and_environment_combine_and_may_agree():
    env = {distributed.ENV_COORDINATOR_ADDRESS: COORD, distributed.ENV_NUM_PROCESSES: "4"}
    plan = resolve(None, 4, 1, env=env)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == (COORD, 4, 1)


@pytest.mark.parametrize("flags, env, message", [
    ((None, 2, 0), {distributed.ENV_NUM_PROCESSES: "4"},
     "--num_processes=2 conflicts with the environment variable INSTRUCTOR_JAX_NUM_PROCESSES=4"),
    ((COORD, None, None), {distributed.ENV_COORDINATOR_ADDRESS: "10.0.0.2:1234"},
     "--coordinator_address=10.0.0.1:1234 conflicts with .*INSTRUCTOR_JAX_COORDINATOR_ADDRESS=10.0.0.2:1234"),
    ((None, None, 1), {distributed.ENV_PROCESS_ID: "0"}, "--process_id=1 conflicts"),
])
def test_a_flag_that_contradicts_the_environment_is_an_error(flags, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(*flags, env=env)


def test_partial_settings_say_what_is_missing():
    with pytest.raises(ValueError, match=r"--num_processes=2 is given but --coordinator_address .* and "
                                         r"--process_id \(or \$INSTRUCTOR_JAX_PROCESS_ID\) are missing"):
        resolve(None, 2, None)
    with pytest.raises(ValueError, match=r"--process_id \(or \$INSTRUCTOR_JAX_PROCESS_ID\) is missing"):
        resolve(None, 2, env={distributed.ENV_COORDINATOR_ADDRESS: COORD})
    # Partial settings are an error even inside SLURM: half-given settings are a mistake, not a hint.
    with pytest.raises(ValueError, match="incomplete"):
        resolve(COORD, env=SLURM)


@pytest.mark.parametrize("args, env, message", [
    ((COORD, 2, 2), {}, r"must be in \[0, 2\)"),
    (("10.0.0.1", 2, 0), {}, "--coordinator_address must be HOST:PORT"),
    ((None, 0, None), {}, "must be >= 1"),
    ((), {distributed.ENV_NUM_PROCESSES: "two"}, r"\$INSTRUCTOR_JAX_NUM_PROCESSES must be an integer"),
    ((None, 1, 3), {}, "out of range for a single process"),
])
def test_bad_values(args, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(*args, env=env)


def test_one_process_needs_nothing_else():
    assert resolve(None, 1).mode == "single"
    assert resolve(env={distributed.ENV_NUM_PROCESSES: "1"}).mode == "single"


def test_slurm_detection():
    assert resolve(env=SLURM) == distributed.Plan("auto", "slurm")
    assert resolve(env={**SLURM, "SLURM_NTASKS": "1"}).mode == "single"  # one task: nothing to join
    assert resolve(env={k: v for k, v in SLURM.items() if k != "SLURM_PROCID"}).mode == "single"  # not in a step
    # A one-task step (`srun -n 1` in a 4-task allocation) must not wait for 3 processes that never come.
    assert resolve(env={**SLURM, "SLURM_STEP_NUM_TASKS": "1"}).mode == "single"
    # Explicit settings win over the cluster's.
    plan = resolve(COORD, 4, 2, env=SLURM)
    assert plan.mode == "explicit" and plan.coordinator_address == COORD
    assert resolve(env={**SLURM, distributed.ENV_AUTO: "0"}).mode == "single"


def test_openmpi_and_tpu_detection():
    assert resolve(env={"OMPI_MCA_orte_hnp_uri": "1.0;tcp://10.0.0.1:1", "OMPI_COMM_WORLD_SIZE": "2"}).source == \
        "openmpi"
    assert resolve(tpu=True) == distributed.Plan("auto", "tpu")
    assert resolve(tpu=True, env={distributed.ENV_AUTO: "false"}).mode == "single"
    assert distributed._on_cloud_tpu_vm() is False  # this machine


# ---------------------------------------------------------------------------------------------------------
# initialize(), with jax.distributed.initialize mocked


@pytest.fixture
def fake_jax_distributed(monkeypatch):
    """Clean settings environment; records jax.distributed.initialize calls instead of making them."""
    for name in list(os.environ):
        if name.startswith(("INSTRUCTOR_JAX_", "SLURM_", "OMPI_")):
            monkeypatch.delenv(name)
    monkeypatch.setattr(distributed, "_initialized", None)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(distributed, "_jax_distributed_is_initialized", lambda: False)
    calls = []

    def fake_initialize(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=None,
                        cluster_detection_method=None, **kwargs):
        given = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                     local_device_ids=local_device_ids, cluster_detection_method=cluster_detection_method, **kwargs)
        calls.append({k: v for k, v in given.items() if v is not None})

    monkeypatch.setattr(jax.distributed, "initialize", fake_initialize)
    return calls


def test_initialize_explicit_calls_jax_once(fake_jax_distributed, monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR_ADDRESS, COORD)
    plan = distributed.initialize(num_processes=2, process_id=1)
    assert plan.mode == "explicit"
    assert fake_jax_distributed == [dict(coordinator_address=COORD, num_processes=2, process_id=1,
                                         cluster_detection_method="deactivate")]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    # Idempotent: the same call, or one without arguments, does nothing more.
    assert distributed.initialize(num_processes=2, process_id=1) is plan
    assert distributed.initialize() is plan
    assert len(fake_jax_distributed) == 1
    with pytest.raises(ValueError, match="already ran"):
        distributed.initialize(num_processes=2, process_id=0)


def test_initialize_auto_and_single(fake_jax_distributed, monkeypatch):
    assert distributed.initialize().mode == "single"
    assert distributed.initialize(num_processes=1).mode == "single"
    with pytest.raises(ValueError, match="cannot be redone"):  # too late to join others
        distributed.initialize(COORD, 2, 0)
    assert fake_jax_distributed == []
    monkeypatch.setattr(distributed, "_initialized", None)
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    assert distributed.initialize().source == "slurm"
    assert fake_jax_distributed == [{}]  # JAX detects the rest


def test_initialize_errors_before_touching_jax(fake_jax_distributed, monkeypatch):
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    with pytest.raises(ValueError, match="conflicts"):
        distributed.initialize(COORD, 2, 0)
    assert fake_jax_distributed == [] and distributed._initialized is None


def test_cli_flags(fake_jax_distributed, monkeypatch, tmp_path, capsys):
    args = build_parser().parse_args(["train", "--workdir", "w", "--coordinator_address", COORD,
                                      "--num_processes", "2", "--process_id", "1"])
    assert (args.coordinator_address, args.num_processes, args.process_id) == (COORD, 2, 1)
    # A partial setting fails as a one-line user error, before any training.
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--workdir", str(tmp_path), "--num_processes", "2"])
    assert exit_info.value.code == 2
    assert "incomplete multi-process settings" in capsys.readouterr().err
    # A gs:// workdir without gcsfs (not a test dependency) or credentials: a one-line error saying what to do.
    with pytest.raises(SystemExit):
        main(["train", "--workdir", "gs://bucket/run"])
    assert "cannot use the workdir gs://bucket/run" in capsys.readouterr().err
    assert fake_jax_distributed == [] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------------------------
# End to end: 2 processes x 2 CPU devices train exactly like 1 process x 4 devices


DRIVER = textwrap.dedent("""
    import logging, sys
    from instructor_jax.runtime import distributed

    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("instructor_jax.runtime.distributed").setLevel(logging.INFO)
    logging.getLogger("instructor_jax.train").setLevel(logging.INFO)

    workdir, coordinator, num_processes, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # "dcn": data parallel across the processes (the slow network), fsdp over each process's 2 devices, and
    # packed batches (each process packs the whole global batch and feeds its share of the rows; at
    # max_seq_length 32 most rows hold one sequence, but the rows, slots and shares are the packed layout's).
    mesh = dict(mesh_shape=(1, 2, 1), dcn_mesh_shape=(2, 1, 1), packing=True) if sys.argv[5] == "dcn" else {}
    if num_processes > 1:
        distributed.initialize(coordinator, num_processes, process_id)
    import jax
    assert (jax.process_count(), jax.device_count()) == (num_processes, 4), (jax.process_count(), jax.devices())
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.loop import train
    train(workdir, TrainConfig(batch_size=8, max_seq_length=32, total_steps=4, warmup_steps=1, save_every=4,
                               log_every=1, eval_every=1000, peak_flops_per_device=1e11, export=False, **mesh))
    print("driver done", process_id, flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(devices: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("INSTRUCTOR_JAX_", "SLURM_", "OMPI_"))}
    env.update(XLA_FLAGS=xla_flags(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return env


def run_all(commands, timeout: float) -> list[str]:
    """Runs (argv, env, log) at once; kills every child if one fails or time runs out; returns the outputs."""
    children = []
    try:
        for argv, env, log in commands:
            children.append((subprocess.Popen(argv, env=env, cwd=REPO, stdout=open(log, "w"),
                                              stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p, _ in children):
            failed = [p for p, _ in children if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p, _ in children:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = [pathlib.Path(log).read_text() for _, log in children]
    for (p, _), output in zip(children, outputs):
        assert p.returncode == 0, "a child failed or timed out:\n" + "\n----\n".join(o[-3000:] for o in outputs)
    return outputs


def step_losses(workdir) -> dict:
    rows = [json.loads(line) for line in pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


@pytest.mark.parametrize("mesh", ["data", "dcn"], ids=["data=4", "dcn data=2 x fsdp=2"])
def test_two_processes_train_like_one(tmp_path, mesh):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    multi, single = tmp_path / "two_processes", tmp_path / "one_process"
    coordinator = f"127.0.0.1:{free_port()}"
    outputs = run_all([([sys.executable, str(script), str(multi), coordinator, "2", str(i), mesh], child_env(2),
                        tmp_path / f"process_{i}.log") for i in range(2)]
                      + [([sys.executable, str(script), str(single), "-", "1", "0", "data"], child_env(4),
                          tmp_path / "single.log")], timeout=240)
    assert all("driver done" in o for o in outputs)
    assert "process 1 of 2: 2 local devices, 4 devices in all (cpu)" in outputs[1]

    two, one = step_losses(multi), step_losses(single)
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    if mesh == "dcn":  # the hybrid mesh: fsdp within each process, data across them; packed against unpacked
        assert "mesh {'data': 2, 'fsdp': 2, 'model': 1} over 4 devices (2 processes)" in outputs[0]
        # Packed and unpacked steps agree within ~1e-6 (tests/train/test_packed_training.py); 1e-5 leaves room for the
        # four AdamW steps and the all-reduce order.
        np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=0, atol=1e-5)
        return
    # Not bit for bit: the cross-process all-reduce may sum in another order than one process does, and any
    # harmless change of the program may move the last bits. A loss near 3 has a float32 ulp of 2.4e-7;
    # rtol 1e-5 allows some tens of ulps accumulated over 4 AdamW steps, while a real divergence (another
    # batch, a missing gradient share) moves it far more.
    np.testing.assert_allclose([two[s] for s in range(1, 5)], [one[s] for s in range(1, 5)], rtol=1e-5, atol=0)
    # The step-4 checkpoint holds what both processes wrote.
    assert sorted(p.name for p in (multi / "checkpoints").iterdir()) == ["4"]
    assert {"process_0", "process_1"} <= {p.name.split(".")[-1] for p in (multi / "checkpoints" / "4" / "state").iterdir()}


PREEMPT_DRIVER = textwrap.dedent("""
    import sys, time
    from instructor_jax.runtime import distributed

    workdir, coordinator, process_id = sys.argv[1], sys.argv[2], int(sys.argv[3])
    distributed.initialize(coordinator, 2, process_id)
    import instructor_jax.train.data as data
    make = data.make_train_iterator
    def slow(*args, **kwargs):
        iterator = make(*args, **kwargs)
        class Slow:
            def __next__(self):
                time.sleep(0.3)
                return next(iterator)
            get_state, set_state = iterator.get_state, iterator.set_state
        return Slow()
    data.make_train_iterator = slow
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.loop import train
    print("result", train(workdir, TrainConfig(batch_size=8, max_seq_length=32, total_steps=200, warmup_steps=1,
                                               save_every=1000, log_every=1, held_out_file=None,
                                               peak_flops_per_device=1e11, export=False)), flush=True)
""")


def test_sigterm_to_one_process_saves_on_all_and_exits(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(PREEMPT_DRIVER)
    coordinator = f"127.0.0.1:{free_port()}"
    env = child_env(2)
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    children = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "run"), coordinator, str(i)],
                                 env=env, cwd=REPO, stdout=open(log, "w"), stderr=subprocess.STDOUT)
                for i, log in enumerate(logs)]
    try:
        deadline = time.monotonic() + 120
        while not ((tmp_path / "run" / "metrics.jsonl").exists() and len(step_losses(tmp_path / "run")) >= 3):
            assert time.monotonic() < deadline and all(p.poll() is None for p in children), "no progress"
            time.sleep(0.2)
        children[1].send_signal(15)  # SIGTERM to process 1 only, as when one host is preempted
        for p in children:
            p.wait(timeout=90)
    finally:
        for p in children:
            if p.poll() is None:
                p.kill()
                p.wait()
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in children] == [0, 0], "\n----\n".join(o[-3000:] for o in outputs)
    assert all("result {'preempted_at':" in o for o in outputs)
