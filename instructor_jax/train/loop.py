"""The trainer: instruction-finetuned contrastive training of an INSTRUCTOR embedder, phase by phase.

    instructor-jax train --gin_file configs/tiny.gin --workdir runs/tiny [--gin_bindings 'TrainConfig.total_steps = 50']

Phases, in the order the data meets them: workdir and logging; mesh; input pipeline; model and optimizer;
shardings and initial state; the update step; checkpoint restore (workdir checkpoint, else `init_from`, else
scratch); the loop (metrics, held-out evaluation, checkpoints, preemption); the final export. A workdir that
holds a checkpoint resumes by itself, exactly: the dropout key of step s is fold_in(seed, s) and the input
iterator's position is saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import time
from typing import Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from instructor_jax.train import data, medi
from instructor_jax.runtime import fileio, host_devices, locks, sharding
from instructor_jax.runtime.interrupts import GracefulStop, Interrupted
from instructor_jax.train.losses import in_batch_retrieval_accuracy
from instructor_jax.model.flops import measure_matmul_peak
from instructor_jax.train.config import TrainConfig, TrainingError
from instructor_jax.train.metrics import MetricWriter
from instructor_jax.train.state import model_config, open_checkpoints, restore_or_init, state_layout
from instructor_jax.train.step import (STAT_KEYS, check_batch_splits, embed, make_batch_layout, make_optimizer,
                                       make_train_step, row_unit)
from instructor_jax.train.workdir import LOCK_NAME, Workdir, check_workdir, export, truncate_metrics
from instructor_jax.model.encoder import InstructorModel
from instructor_jax.model.tokenization import InstructionTokenizer

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def train(workdir, cfg: Optional[TrainConfig] = None, devices=None) -> dict:
    """Runs (or resumes) training in `workdir` on `devices` (default: all, of all processes).

    Returns the held-out accuracy before and after, the final step, and the final parameters. A local
    workdir is locked (W/.instructor-jax.lock) for the run. The first Ctrl-C saves a checkpoint at the
    current step and raises `Interrupted`; a second exits at once.
    """
    cfg = (cfg or TrainConfig()).validate()
    mesh = training_mesh(cfg, devices)  # before the workdir: a batch that cannot be split is refused first
    if fileio.is_url(workdir) or jax.process_index() != 0:
        # Process 0 speaks for the job; a bucket offers no create-if-absent to lock with.
        return _train(workdir, cfg, mesh)
    check_workdir(workdir)
    with locks.held(pathlib.Path(workdir) / LOCK_NAME, f"the workdir {workdir}"):
        return _train(workdir, cfg, mesh)


def _train(workdir, cfg: TrainConfig, mesh) -> dict:
    is_chief = jax.process_index() == 0  # process 0 writes logs and exports; checkpoints are written by all
    rules = cfg.logical_axis_rules
    run_dir = Workdir(workdir, cfg, is_chief)
    checkpoint_dir = run_dir.checkpoint_dir(cfg)
    manager = open_checkpoints(checkpoint_dir, cfg)
    run_dir.record_settings(cfg, manager.latest_step())  # a resume with changed settings is refused here
    config, init_params, tokenizer_dir = model_config(cfg)
    inputs = open_inputs(cfg, config, tokenizer_dir, mesh)
    model = InstructorModel(config.encoder, config.head)
    tx, schedule = make_optimizer(cfg)
    layout = state_layout(model, tx, mesh, rules)
    programs = Programs(model, tx, schedule, cfg, layout, mesh, rules)

    state, data_state, resumed_at = restore_or_init(manager, layout, checkpoint_dir, init_params, cfg, mesh, rules,
                                                    tx)
    if resumed_at is not None:
        inputs.train.set_state(data_state)
        truncate_metrics(run_dir.path / "metrics.jsonl", resumed_at, is_chief)
    writer = MetricWriter(run_dir.path, enabled=is_chief)
    evaluator = Evaluator(cfg, config, inputs, programs, writer, is_chief)

    accuracy_before = evaluator.evaluate(state["params"], int(state["step"]), announce=True)
    state, step, preempted = run_loop(state, cfg, inputs, programs, manager, checkpoint_dir, writer, evaluator,
                                      run_dir)
    if preempted:
        return {"preempted_at": step}

    accuracy_after = evaluator.evaluate(state["params"], step, announce=True, final=True)
    writer.close()
    if cfg.export:
        export(run_dir.path, config, state["params"], tokenizer_dir, is_chief, shown=run_dir.name)
    run_dir.sync()  # the final evaluation's line and the exports
    manager.close()
    return {"held_out_accuracy_before": accuracy_before, "held_out_accuracy": accuracy_after, "step": step,
            "params": state["params"], "opt_state": state["opt_state"], "train_step_programs": programs.count}


def training_mesh(cfg: TrainConfig, devices=None):
    # On a CPU, one device per process unless the user asked for more (see instructor_jax.runtime.host_devices).
    devices = devices if devices is not None else host_devices.training_devices()
    mesh = sharding.make_mesh(cfg.mesh_shape, devices, cfg.dcn_mesh_shape)
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    check_batch_splits(cfg, mesh)
    return mesh


@dataclasses.dataclass
class Inputs:
    tokenizer: InstructionTokenizer
    train: data.TrainIterator  # single-task batches, each process reading its rows of every global batch
    held_out: list  # held-out batches (TrainConfig.held_out_file), every process holding all of each


def open_inputs(cfg: TrainConfig, config, tokenizer_dir, mesh) -> Inputs:
    tokenizer = InstructionTokenizer.from_directory(tokenizer_dir, **config.tokenizer_settings())
    examples = data.open_examples(cfg.train_file, skip_bad=cfg.skip_bad_records, tfds_data_dir=cfg.tfds_data_dir,
                                  skip_hint=medi.TRAIN_SKIP_BAD_HINT)
    train_iter = data.make_train_iterator(examples, cfg.batch_size, tokenizer, cfg.num_negatives,
                                          seed=cfg.data_seed, process_index=jax.process_index(),
                                          process_count=jax.process_count(),
                                          transform=make_batch_layout(cfg, config, row_unit(mesh, cfg)))
    held_out = []
    if cfg.held_out_file:
        held_out = data.held_out_batches(medi.read_medi(cfg.held_out_file, skip_bad=cfg.skip_bad_records,
                                                        skip_hint=medi.TRAIN_SKIP_BAD_HINT),
                                         cfg.batch_size, tokenizer, num_negatives=0)
    return Inputs(tokenizer, train_iter, held_out)


class Programs:
    """The jitted programs: the update step over the global batch (state donated) and held-out scoring."""

    def __init__(self, model, tx, schedule, cfg: TrainConfig, layout, mesh, rules):
        self.mesh, self.rules, self.count = mesh, rules, 0  # count: train-step programs compiled (bounded)
        train_step = make_train_step(model, tx, schedule, cfg)

        def counted_train_step(state, batch):
            self.count += 1  # Python runs here only while tracing: this counts compilations
            return train_step(state, batch)

        def eval_step(params, batch):
            return in_batch_retrieval_accuracy(embed(model, params, batch, "query"), embed(model, params, batch, "pos"))

        with sharding.activate(mesh, rules):
            self._step = jax.jit(counted_train_step, in_shardings=(layout.shardings, None),
                                 out_shardings=(layout.shardings, None), donate_argnums=(0,))
            self._eval = jax.jit(eval_step, in_shardings=(layout.params, None))

    def global_batch(self, local: dict) -> dict:
        """This process's rows -> arrays over the whole mesh, batch axis split over data and fsdp."""
        return {k: jax.make_array_from_process_local_data(sharding.batch_sharding(self.mesh, v.ndim), v)
                for k, v in local.items()}

    def step(self, state, local: dict):
        with sharding.activate(self.mesh, self.rules):
            return self._step(state, self.global_batch(local))

    def held_out_accuracy(self, params, batches) -> float:
        with sharding.activate(self.mesh, self.rules):
            scores = [self._eval(params, self.global_batch(_local_rows(b))) for b in batches]
        return float(np.mean([float(s) for s in scores]))


class Evaluator:
    """Held-out in-batch accuracy and TrainConfig.eval_tasks' main scores, logged (by process 0; every
    process takes part)."""

    def __init__(self, cfg: TrainConfig, config, inputs: Inputs, programs: Programs, writer, is_chief: bool):
        self.batch_size, self.held_out, self.programs = cfg.batch_size, inputs.held_out, programs
        self.writer, self.is_chief = writer, is_chief
        self.tasks = None
        if cfg.eval_tasks:
            from instructor_jax.evaluation.training import make_task_evaluator

            self.tasks = make_task_evaluator(cfg.eval_tasks, config, inputs.tokenizer.tokenizer, programs.mesh,
                                             programs.rules)

    def evaluate(self, params, step: int, announce: bool = False, final: bool = False) -> float:
        accuracy = float("nan")
        if self.held_out:
            accuracy = self.programs.held_out_accuracy(params, self.held_out)
            self.writer.write(step, {"held_out_accuracy": accuracy})
            if announce and self.is_chief:
                chance = "" if final else f" (chance {1 / self.batch_size:.3f})"
                print(f"held-out in-batch retrieval accuracy at step {step}: {accuracy:.3f}{chance}", flush=True)
        if self.tasks is not None:
            scores = self.tasks(params)
            if scores is not None:
                self.writer.write(step, {f"eval/{name}": score for name, score in scores.items()})
                print(f"eval_tasks at step {step}: " + ", ".join(f"{n} {s:.3f}" for n, s in scores.items()),
                      flush=True)
        return accuracy


class Throughput:
    """Examples, real tokens, computed slots and FLOPs since the last logged step, as rates."""

    def __init__(self, cfg: TrainConfig, devices: int):
        self.batch_size, self.devices = cfg.batch_size, devices
        self.peak = cfg.peak_flops_per_device or measure_matmul_peak(cfg.dtype)
        self.reset()

    def reset(self) -> None:
        self.start, self.examples, self.tokens, self.slots, self.flops = time.perf_counter(), 0, 0, 0, 0.0

    def add(self, counts: dict) -> None:
        self.examples += self.batch_size
        self.tokens += int(counts["stat_real_tokens"])
        self.slots += int(counts["stat_slots"])
        self.flops += float(counts["stat_real_flops"])

    def rates(self) -> dict:
        seconds = time.perf_counter() - self.start
        # Tokens are real ones (query + pos + neg, padding excluded) whatever the layout; tokens_per_s is
        # real_tokens_per_s under its older name. padding_fraction: padded slots / slots computed.
        rates = dict(examples_per_s=self.examples / seconds, tokens_per_s=self.tokens / seconds,
                     real_tokens_per_s=self.tokens / seconds,
                     tokens_per_s_per_device=self.tokens / seconds / self.devices,
                     padding_fraction=1 - self.tokens / self.slots,
                     mfu=self.flops / seconds / (self.peak * self.devices))
        self.reset()
        return rates


def run_loop(state, cfg: TrainConfig, inputs: Inputs, programs: Programs, manager, checkpoint_dir, writer,
             evaluator: Evaluator, run_dir: Workdir):
    """Steps until total_steps: metrics, evaluations, checkpoints; a preemption (SIGTERM) saves and returns
    (state, step, True); the first Ctrl-C saves and raises `Interrupted`. Returns (state, step, False)."""
    def save(step: int, state) -> None:
        if step in manager.all_steps():
            return  # saved already at this step (by the schedule, then by a stop request)
        manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(inputs.train.get_state())), force=True)
        writer.flush()
        run_dir.sync()  # the logs so far, at the checkpoints' cadence

    throughput = Throughput(cfg, programs.mesh.size)
    preempted = []
    # One process: our own SIGTERM flag. Several: jax.distributed's preemption notifier owns SIGTERM and
    # reached_preemption() makes every process save at the same step; replacing its handler would let
    # one process stop alone and hang the others in a collective.
    previous_handler = (signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
                        if jax.process_count() == 1 else None)
    step = int(state["step"])
    progress = tqdm(total=cfg.total_steps, initial=step, desc="training", unit="step", disable=not run_dir.is_chief,
                    mininterval=2.0)
    # One process: the first Ctrl-C asks the loop to save and stop. Several: Ctrl-C keeps its default, as
    # stopping one process alone would hang the others in a collective.
    stop = GracefulStop() if jax.process_count() == 1 else None
    if stop is not None:
        stop.__enter__()
    try:
        while step < cfg.total_steps:
            local = next(inputs.train)
            throughput.add({k: local.pop(k) for k in STAT_KEYS})  # the global batch's, the same on every process
            state, metrics = programs.step(state, local)
            step += 1
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                raise TrainingError(
                    f"the loss or gradient became {metrics['loss']:.3g} / {metrics['grad_norm']:.3g} at step {step}; "
                    f"stopping. The last good checkpoint (step {manager.latest_step()}) is intact: lower the "
                    "learning rate or check the data, then rerun to resume from it")
            progress.update(1)
            progress.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)  # redraws only every mininterval
            if step % cfg.log_every == 0 or step == cfg.total_steps:
                writer.write(step, {**{k: v for k, v in metrics.items() if k != "finite"}, **throughput.rates()})
            if step % cfg.eval_every == 0 and step < cfg.total_steps:
                evaluator.evaluate(state["params"], step)
            if step % cfg.save_every == 0 or step == cfg.total_steps:
                save(step, state)
            if preempted or manager.reached_preemption(step):
                save(step, state)
                manager.wait_until_finished()
                log.warning("preempted: saved the checkpoint of step %d; rerun the same command to resume", step)
                return state, step, True
            if stop is not None and stop.requested:
                save(step, state)
                manager.wait_until_finished()
                raise Interrupted(f"interrupted: saved the checkpoint of step {step} in {checkpoint_dir}; rerun "
                                  "the same command to resume from it")
    finally:
        if stop is not None:
            stop.__exit__(None, None, None)
        progress.close()
        manager.wait_until_finished()
        writer.flush()
        run_dir.sync()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    return state, step, False


def _local_rows(batch: dict) -> dict:
    """This process's contiguous share of a global batch's rows."""
    count, index = jax.process_count(), jax.process_index()
    rows = next(iter(batch.values())).shape[0]
    return {k: v[index * rows // count:(index + 1) * rows // count] for k, v in batch.items()}

