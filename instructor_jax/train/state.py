"""The training state: where its parameters come from (a checkpoint to start from, or scratch), and
restoring the newest checkpoint that can be restored."""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.runtime import fileio, sharding
from instructor_jax.model.config import InstructorConfig
from instructor_jax.train.config import TrainConfig, TrainingError, tiny_encoder
from typing import Callable
from instructor_jax.model import encoder as model_encoder
from instructor_jax.model.encoder import init_boxed_params, stack_layers

log = logging.getLogger(__name__)

log = logging.getLogger(__name__)


def model_config(cfg: TrainConfig) -> tuple[InstructorConfig, Optional[dict], pathlib.Path]:
    """(config, flat numpy params or None, tokenizer directory): from `init_from`, else from scratch."""
    numerics = {"dtype": cfg.dtype, "param_dtype": "float32", "remat": cfg.remat, "scan_layers": cfg.scan_layers,
                "attention": cfg.attention, "fused_qkv": cfg.fused_qkv, "bfloat16_elementwise": cfg.bfloat16_elementwise}
    if cfg.attention_dropout_rate is not None:  # None keeps the encoder's own
        numerics["attention_dropout_rate"] = cfg.attention_dropout_rate
    if cfg.init_from is not None:
        from instructor_jax.checkpoints.hub import resolve_model_path

        source = resolve_model_path(cfg.init_from)
        config, params, tokenizer_dir = convert.read_any(source, pooling_rule=cfg.pooling_rule,
                                                         pooling_rule_source="TrainConfig.pooling_rule")
        params = {k: np.asarray(v, np.float32) for k, v in params.items()}  # float32 master weights
        if cfg.scan_layers:
            params = stack_layers(params, config.encoder.num_layers)
        # The training recipe decides sequence length and pooling: GTR, for one, pools the instruction
        # too, while INSTRUCTOR training leaves it out.
        config = config.replace(encoder=dataclasses.replace(config.encoder, **numerics),
                                max_seq_length=cfg.max_seq_length, pooling_rule=cfg.pooling_rule)
        return config, params, pathlib.Path(tokenizer_dir)
    encoder = dataclasses.replace(cfg.encoder or tiny_encoder(), **numerics).validate()
    config = InstructorConfig(encoder=encoder, head=cfg.head, max_seq_length=cfg.max_seq_length,
                              pooling_rule=cfg.pooling_rule)
    return config, None, pathlib.Path(cfg.tokenizer)


@dataclasses.dataclass
class StateLayout:
    """The training state's shapes and shardings ({"step", "params", "opt_state"}), and `init`, which
    materializes a fresh state directly on the devices each part belongs to."""
    abstract: dict
    shardings: dict
    init: Callable

    @property
    def params(self):
        return self.shardings["params"]


def state_layout(model, tx, mesh, rules) -> StateLayout:
    """Shapes first (eval_shape), then shardings from the logical rules: nothing is computed."""
    def init_state(rng):
        params = nn.unbox(init_boxed_params(model, rng))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    with sharding.activate(mesh, rules):
        param_shardings = model_encoder.param_shardings(model, mesh, rules)
        abstract = jax.eval_shape(init_state, jax.random.PRNGKey(0))
        shardings = {
            "step": sharding.replicated(mesh),
            "params": param_shardings,
            # Optimizer moments take their parameter's sharding; counters are replicated.
            "opt_state": optax.tree_map_params(tx, lambda _, s: s, abstract["opt_state"], param_shardings,
                                               transform_non_params=lambda _: sharding.replicated(mesh)),
        }
        return StateLayout(abstract, shardings, jax.jit(init_state, out_shardings=shardings))


def open_checkpoints(checkpoint_dir, cfg) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(checkpoint_dir, options=ocp.CheckpointManagerOptions(
        max_to_keep=cfg.keep_checkpoints, enable_async_checkpointing=True, create=True))


def restore_or_init(manager, layout: StateLayout, checkpoint_dir, init_params, cfg, mesh, rules, tx):
    """(state, restored data-iterator state or None, the step restored or None): the workdir's newest good
    checkpoint, else `init_params` (TrainConfig.init_from), else a fresh initialization."""
    if manager.latest_step() is not None:
        target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                              layout.abstract, layout.shardings)
        latest, restored = restore_newest_good(manager, target, checkpoint_dir)
        log.warning("resuming from the checkpoint of step %d in %s", latest, checkpoint_dir)
        return restored["state"], restored["data"], latest
    with sharding.activate(mesh, rules):
        state = layout.init(jax.random.PRNGKey(cfg.seed))
    if init_params is not None:
        state["params"] = place_params(init_params, layout.params)
        with sharding.activate(mesh, rules):
            state["opt_state"] = jax.jit(tx.init, out_shardings=layout.shardings["opt_state"])(state["params"])
        log.info("initialized from %s", cfg.init_from)
    return state, None, None


def restore_newest_good(manager, target, checkpoint_dir) -> tuple[int, dict]:
    """(step, restored) of the newest checkpoint that can be restored.

    A damaged one (a crash while writing, a disk error) is reported with its step and reason and skipped
    for the one before it. It is never deleted: on a local directory and one process it is renamed
    STEP.damaged (so that saving that step again can succeed), else the run stops and says to move it.
    """
    damaged = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
        except ValueError as e:
            if "do not match" not in str(e):
                damaged.append((step, e))
                continue
            where = "; ".join(str(e).splitlines()[:2])  # orbax's verdict and the first differing path
            raise ValueError(f"the checkpoint of step {step} in {checkpoint_dir} does not fit this run's model "
                             f"({where[:300]}). It was written with other settings: another model or another "
                             "TrainConfig.scan_layers (stacked vs per-layer parameters). Resume with the settings "
                             "that wrote it, or start in a new workdir") from None
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise many kinds for a damaged file
            damaged.append((step, e))
            continue
        break
    else:
        reasons = "; ".join(f"step {s}: {_first_line(e)}" for s, e in damaged)
        raise TrainingError(f"no checkpoint in {checkpoint_dir} can be restored ({reasons}). Move them aside to "
                            "start over, or point TrainConfig.checkpoint_dir elsewhere")
    for bad, error in damaged:
        log.error("the checkpoint of step %d in %s cannot be restored: %s", bad, checkpoint_dir, _first_line(error))
        if fileio.is_url(checkpoint_dir) or jax.process_count() > 1:
            raise TrainingError(f"the checkpoint of step {bad} in {checkpoint_dir} cannot be restored "
                                f"({_first_line(error)}); step {step} can. Move {checkpoint_dir}/{bad} aside (it is "
                                f"not deleted automatically) and rerun to resume from step {step}")
        kept = pathlib.Path(checkpoint_dir, f"{bad}.damaged")
        while kept.exists():
            kept = kept.with_name(kept.name + "_")
        os.replace(pathlib.Path(checkpoint_dir, str(bad)), kept)
        log.warning("kept it as %s; falling back to the checkpoint of step %d", kept, step)
    if damaged:
        manager.reload()
    return step, restored


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def place_params(flat_params: dict, shardings) -> dict:
    """Host numpy parameters (flat names) -> arrays laid out as `shardings` says, one tensor at a time."""
    flat_shardings = tensor_table.flatten_params(shardings)
    missing = set(flat_shardings) ^ set(flat_params)
    if missing:
        raise ValueError(f"the checkpoint's parameters do not match the model: {sorted(missing)[:5]}")
    return tensor_table.unflatten_params({k: jax.device_put(v, flat_shardings[k]) for k, v in flat_params.items()})

