"""The launch scripts: what their dry runs print, the SLURM job with stand-in srun/scontrol, and a real
two-process run of local_multiprocess.sh."""

import json
import os
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest

REPO = pathlib.Path(__file__).parents[1]
LAUNCH = REPO / "launch"
BINDING = 'TrainConfig.train_file = "/data/my medi.jsonl"'  # spaces and quotes survive every layer


# Settings the scripts read from the environment: none may leak in from the test's own.
SCRIPT_SETTINGS = {"DRY_RUN", "MODE", "PORT", "GPUS_PER_NODE", "PARTITION", "ACCOUNT", "TIME", "JOB_NAME", "VENV",
                   "SBATCH_FILE", "PROJECT", "REPO_URL", "REPO_DIR", "JAX_TPU_SPEC", "SKIP_SETUP",
                   "DEVICES_PER_PROCESS", "PLATFORM", "INSTRUCTOR_JAX", "LOG_DIR"}


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in SCRIPT_SETTINGS and not k.startswith(("INSTRUCTOR_JAX_", "SLURM_", "OMPI_"))}
    env.update(extra)
    return env


def bash(script, *args, env=None, timeout=60, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(["bash", str(LAUNCH / script), *args], env=env or clean_env(), cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("script", ["local_multiprocess.sh", "tpu_pod.sh", "slurm.sh"])
def test_usage_without_arguments(script):
    result = bash(script, check=False)
    assert result.returncode == 2 and "--dry-run" in result.stderr and script in result.stderr


def test_tpu_pod_dry_run():
    out = bash("tpu_pod.sh", "--dry-run", "my-v4-32", "us-central2-b", "configs/instructor_base.gin",
               "gs://my-bucket/runs/base", BINDING, "TrainConfig.total_steps = 10").stdout
    lines = [shlex.split(line) for line in out.splitlines()]
    assert [line[0] for line in lines] == ["tar", "gcloud", "gcloud", "gcloud"]
    ssh = [line for line in lines if line[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert len(ssh) == 2 and all("--worker=all" in line and line[5] == "my-v4-32" for line in ssh)
    assert "scp" in lines[1] and "--worker=all" in lines[1]
    setup, train = (line[line.index("--command") + 1] for line in ssh)
    assert "pip install -q -U 'jax[tpu]'" in setup and "pip install -q -e ~/instructor-jax'[gcs]'" in setup
    # The remote shell parses the command back into exactly the arguments given; no coordinator flags.
    remote = shlex.split(train)
    assert remote[remote.index("&&") + 1:] == [
        "~/instructor-jax-venv/bin/instructor-jax", "train", "--gin_file", "configs/instructor_base.gin",
        "--workdir", "gs://my-bucket/runs/base", "--gin_bindings", BINDING,
        "--gin_bindings", "TrainConfig.total_steps = 10"]
    # DRY_RUN=1 is the same as --dry-run; SKIP_SETUP and REPO_URL change the set-up only.
    env = clean_env(DRY_RUN="1", SKIP_SETUP="1")
    assert bash("tpu_pod.sh", "t", "z", "c.gin", "w", env=env).stdout.count("\n") == 1
    env = clean_env(DRY_RUN="1", REPO_URL="https://example.com/instructor-jax.git")
    assert "git clone --depth 1 https://example.com/instructor-jax.git" in bash("tpu_pod.sh", "t", "z", "c.gin",
                                                                                  "w", env=env).stdout


def test_slurm_dry_run_prints_the_job():
    out = bash("slurm.sh", "--dry-run", "4", "configs/tiny.gin", "/shared/run", BINDING,
               env=clean_env(GPUS_PER_NODE="8", PARTITION="gpu")).stdout
    for piece in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                  "#SBATCH --partition=gpu", "scontrol show hostnames", "srun --kill-on-bad-exit=1",
                  '--coordinator_address "$COORDINATOR"', '--num_processes "$SLURM_NTASKS"',
                  '--process_id "$SLURM_PROCID"', "train --gin_file configs/tiny.gin --workdir /shared/run"):
        assert piece in out, piece
    per_gpu = bash("slurm.sh", "2", "configs/tiny.gin", "/shared/run",
                   env=clean_env(DRY_RUN="1", MODE="per-gpu", GPUS_PER_NODE="4")).stdout
    assert "#SBATCH --ntasks-per-node=4" in per_gpu and "--coordinator_address" not in per_gpu
    assert "srun --kill-on-bad-exit=1 instructor-jax train --gin_file configs/tiny.gin" in per_gpu


FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: skips its options and runs the command once per task, as SLURM would set them.
while [[ "$1" == --* ]]; do shift; done
export SLURM_JOB_ID=4242 SLURM_STEP_NODELIST="$SLURM_JOB_NODELIST" SLURM_NTASKS=$FAKE_NTASKS
for ((i = 0; i < FAKE_NTASKS; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % FAKE_PER_NODE)) "$@" || exit 1; done
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
printf 'gpu-node-07\\ngpu-node-08\\n'
"""
FAKE_TRAIN = """#!{python}
# Stand-in for instructor-jax: how this task would initialize, without initializing.
import json, sys
from instructor_jax.cli import build_parser
from instructor_jax.runtime import distributed
args = build_parser().parse_args(sys.argv[1:])
plan = distributed.resolve(args.coordinator_address, args.num_processes, args.process_id)
print(json.dumps([plan.mode, plan.source, plan.coordinator_address, plan.num_processes, plan.process_id,
                  args.workdir, args.gin_bindings]))
"""


@pytest.mark.parametrize("mode", ["per-node", "per-gpu"])
def test_slurm_job_runs_one_train_command_per_task(tmp_path, mode):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL),
                       ("instructor-jax", FAKE_TRAIN.format(python=sys.executable))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    sbatch = tmp_path / "job.sbatch"
    sbatch.write_text(bash("slurm.sh", "2", "configs/tiny.gin", str(tmp_path / "run"), BINDING,
                           env=clean_env(DRY_RUN="1", MODE=mode, GPUS_PER_NODE="2", PORT="23456")).stdout)
    tasks = 2 if mode == "per-node" else 4
    env = clean_env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-node-[07-08]",
                    FAKE_NTASKS=str(tasks), FAKE_PER_NODE=str(tasks // 2),
                    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(["bash", str(sbatch)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    plans = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(plans) == tasks
    for i, (plan_mode, source, coordinator, count, index, workdir, bindings) in enumerate(plans):
        assert workdir == str(tmp_path / "run") and bindings == [BINDING]
        if mode == "per-node":
            assert (plan_mode, coordinator, count, index) == ("explicit", "gpu-node-07:23456", 2, i)
        else:
            assert (plan_mode, source) == ("auto", "slurm")


def test_local_multiprocess_dry_run():
    out = bash("local_multiprocess.sh", "--dry-run", "3", "configs/tiny.gin", "/tmp/run", BINDING,
               env=clean_env(PORT="23456", DEVICES_PER_PROCESS="4", INSTRUCTOR_JAX="instructor-jax")).stdout
    lines = out.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("wait")
    for i, line in enumerate(lines[:3]):
        words = shlex.split(line)
        assert words[0] == "env" and words[2] == "JAX_PLATFORMS=cpu"
        # The caller's XLA_FLAGS are kept, with the device count last (the one XLA uses).
        assert words[1] == f"XLA_FLAGS={os.environ['XLA_FLAGS']} --xla_force_host_platform_device_count=4"
        command = words[3:words.index("&") if "&" in words else None]
        assert command[:2] == ["instructor-jax", "train"]
        assert ["--coordinator_address", "127.0.0.1:23456", "--num_processes", "3", "--process_id", str(i)] == \
            [w for w in command if w in ("--coordinator_address", "127.0.0.1:23456", "--num_processes", "3",
                                         "--process_id", str(i))]
        assert ["--gin_bindings", BINDING] == command[command.index("--gin_bindings"):][:2]
        assert (i == 0) == ("process_logs" not in line)


ENCODE = ["encode", "--model", "models/large", "--input", "gs://my-bucket/my corpus.jsonl", "--output",
          "gs://my-bucket/emb/emb.npy", "--ids", "gs://my-bucket/emb/ids.txt", "--store_dtype", "bfloat16"]


def test_every_script_takes_a_subcommand_and_its_arguments(tmp_path):
    """The second form, SUBCOMMAND ARG ...: the arguments reach instructor-jax as given, with each script's
    multi-process flags after them; the first form (GIN WORKDIR) is what the tests above check."""
    out = bash("local_multiprocess.sh", "--dry-run", "2", "encode", "--model", "m", "--input", "my in.jsonl",
               "--output", "out dir/emb.npy", env=clean_env(PORT="23456", INSTRUCTOR_JAX="instructor-jax")).stdout
    lines = out.splitlines()
    assert len(lines) == 3 and lines[-1].startswith("wait")
    for i, line in enumerate(lines[:2]):
        words = shlex.split(line)
        command = words[3:words.index("&")]
        assert command == ["instructor-jax", "encode", "--model", "m", "--input", "my in.jsonl", "--output",
                           "out dir/emb.npy", "--coordinator_address", "127.0.0.1:23456", "--num_processes", "2",
                           "--process_id", str(i)] + ([">", "out dir/process_logs/process_1.log", "2>&1"] if i else [])
    # LOG_DIR: beside an encode's output, under a training's workdir, else ./process_logs.
    for args, log_dir in ((["train", "--workdir=/w", "--gin_file", "c.gin"], "/w/process_logs"),
                          (["encode", "--output", "gs://b/e.npy"], "process_logs"),
                          (["eval", "--model", "m"], "process_logs")):
        out = bash("local_multiprocess.sh", "--dry-run", "2", *args, env=clean_env(PORT="1")).stdout
        assert f"> {log_dir}/process_1.log 2>&1 &" in out, out

    out = bash("tpu_pod.sh", "t", "z", *ENCODE, env=clean_env(DRY_RUN="1", SKIP_SETUP="1")).stdout
    (ssh,) = [shlex.split(line) for line in out.splitlines()]
    remote = shlex.split(ssh[ssh.index("--command") + 1])
    assert remote[remote.index("&&") + 1:] == ["~/instructor-jax-venv/bin/instructor-jax", *ENCODE]

    script = bash("slurm.sh", "--dry-run", "2", *ENCODE).stdout
    srun = script[script.index("srun"):]
    assert "--num_processes \"$SLURM_NTASKS\" --process_id \"$SLURM_PROCID\"' _" in srun
    assert shlex.split(srun.split("' _ \\\n", 1)[1].splitlines()[0]) == ENCODE
    per_gpu = bash("slurm.sh", "--dry-run", "2", *ENCODE, env=clean_env(MODE="per-gpu")).stdout
    assert "srun --kill-on-bad-exit=1 instructor-jax encode --model models/large" in per_gpu

    # A first word that is no subcommand is the training form, which needs GIN_FILE and WORKDIR.
    for script_args in (["local_multiprocess.sh", "2", "configs/tiny.gin"], ["slurm.sh", "2", "configs/tiny.gin"],
                        ["tpu_pod.sh", "t", "z", "configs/tiny.gin"]):
        result = bash(*script_args, check=False)
        assert result.returncode == 2 and "SUBCOMMAND" in result.stderr, result.stderr


def test_local_multiprocess_stops_the_others_when_one_fails(tmp_path):
    fake = tmp_path / "fake_train.sh"
    fake.write_text(textwrap.dedent("""\
        # process 1 fails at once; the others would run for a minute
        for a in "$@"; do last=$a; done
        if [[ "$last" == 1 ]]; then echo "process 1 fails" >&2; exit 7; fi
        exec sleep 60
    """))
    # Were the others left running, their `sleep`s would hold the output pipe open past the timeout.
    result = bash("local_multiprocess.sh", "3", "configs/tiny.gin", str(tmp_path / "run"), check=False, timeout=30,
                  env=clean_env(INSTRUCTOR_JAX=f"bash {fake}"))
    assert result.returncode == 7, result.stdout + result.stderr
    assert "a process failed (status 7); stopping the others" in result.stderr
    assert "process 1 fails" in (tmp_path / "run" / "process_logs" / "process_1.log").read_text()


def test_local_multiprocess_trains_with_two_processes(tmp_path):
    bindings = ["TrainConfig.total_steps = 2", "TrainConfig.batch_size = 8", "TrainConfig.max_seq_length = 32",
                "TrainConfig.warmup_steps = 1", "TrainConfig.log_every = 1", "TrainConfig.held_out_file = None",
                "TrainConfig.peak_flops_per_device = 1e11", "TrainConfig.export = False"]
    workdir = tmp_path / "run"
    env = clean_env(INSTRUCTOR_JAX=f"{sys.executable} -m instructor_jax.cli",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = bash("local_multiprocess.sh", "2", "configs/tiny.gin", str(workdir), *bindings, env=env, timeout=180)
    assert "all 2 processes finished" in result.stderr
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]
