"""Checkpoints both ways: sentence-transformers / PyTorch directories <-> instructor-jax directories.

Every tensor goes through the one table in `tensor_table` (so reading, writing and validation cannot
disagree); t5x checkpoints are read and written by `t5x`, which uses the same table. Conversion works on numpy arrays one tensor at a time and never imports JAX, so it stays
fast and its peak memory stays near one copy of the checkpoint.

Native layout (what `Instructor.save_pretrained` writes):
    instructor_jax.json     InstructorConfig (encoder shape, head, tokenization and pooling rules, prompts)
    params.safetensors      flat t5x-style names, e.g. "encoder/layers_0/attention/query" [d_model, heads, d_kv]
    tokenizer files         as transformers saves them
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
from typing import Optional

import numpy as np

from instructor_jax.checkpoints import t5x as t5x_checkpoint
from instructor_jax.checkpoints.tensor_table import cast, dense_layout, encoder_layout, native_layout, read_table
from instructor_jax.checkpoints.tokenizer_files import TOKENIZER_FILES, copy_tokenizer
from instructor_jax.model.config import (NATIVE_CONFIG, HeadConfig, InstructorConfig, encoder_config_from_t5,
                                   t5_config_from_encoder)
from instructor_jax.runtime.fileio import atomic_directory, check_no_links_out, check_replaceable
from instructor_jax.checkpoints.hub import resolve_model
from instructor_jax.checkpoints.pooling_evidence import decide_pooling_rule
from instructor_jax.checkpoints.pooling_evidence import log as pooling_log
from instructor_jax.checkpoints.weights import SAFETENSORS, open_weights, save_safetensors

log = logging.getLogger(__name__)

NATIVE_PARAMS = "params.safetensors"
IDENTITY_ACTIVATIONS = ("torch.nn.modules.linear.Identity", "torch.nn.Identity")
# Tensors a T5 checkpoint may hold that an encoder does not use.
IGNORED_PREFIXES = ("decoder.", "lm_head.")
TIED_EMBEDDING = "encoder.embed_tokens.weight"


# ----------------------------------------------------------------------------------------------------
# sentence-transformers directories
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SentenceTransformersLayout:
    """Where a sentence-transformers directory keeps each module, read from modules.json by idx."""

    transformer: pathlib.Path
    pooling: pathlib.Path
    dense: Optional[pathlib.Path]
    normalize: bool


def _read_json(path: pathlib.Path, what: str) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; a {what} needs it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from e
    # modules.json is the one list; every other file here must be an object, or `.get` fails obscurely.
    if not isinstance(data, list if path.name == "modules.json" else dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not the "
                         f"{'list' if path.name == 'modules.json' else 'object'} a {what} has; is it the right file?")
    return data


def read_modules(directory: pathlib.Path) -> SentenceTransformersLayout:
    modules = _read_json(directory / "modules.json", "sentence-transformers model")
    try:
        modules = sorted(modules, key=lambda m: int(m["idx"]))
        kinds = [(m["type"], directory / m.get("path", "")) for m in modules]
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{directory / 'modules.json'} is malformed ({e}); expected a list of "
                         "{idx, path, type} entries") from e
    outside = [str(path) for _, path in kinds if not path.resolve().is_relative_to(directory.resolve())]
    if outside:
        raise ValueError(f"{directory / 'modules.json'} places modules outside the model directory ({outside}); "
                         "a module's path must be a folder inside it")
    # Re-saved copies use InstructorEmbedding's types and folder names: match on the class name's end.
    expected = ["Transformer", "Pooling", "Dense", "Normalize"]
    names = [t.rsplit(".", 1)[-1] for t, _ in kinds]
    if not names or not names[0].endswith("Transformer") or len(names) < 2 or not names[1].endswith("Pooling"):
        raise ValueError(f"{directory / 'modules.json'} lists {names}; instructor-jax reads pipelines "
                         f"of the form {expected} (Dense and Normalize optional)")
    rest = names[2:]
    dense = kinds[2][1] if rest and rest[0].endswith("Dense") else None
    rest = rest[1:] if dense is not None else rest
    normalize = bool(rest) and rest[0].endswith("Normalize")
    if rest[1 if normalize else 0:]:
        raise ValueError(f"{directory / 'modules.json'} lists modules instructor-jax cannot run: {rest}; "
                         f"supported pipelines are {expected} (Dense and Normalize optional)")
    return SentenceTransformersLayout(transformer=kinds[0][1], pooling=kinds[1][1], dense=dense, normalize=normalize)


def _check_mean_pooling(pooling: dict, source: pathlib.Path) -> None:
    mode = pooling.get("pooling_mode")
    if mode is None:
        modes = [k[len("pooling_mode_"):] for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
        mode = modes[0] if len(modes) == 1 else "+".join(modes)
    if mode not in ("mean", "mean_tokens"):
        raise ValueError(f"{source}: pooling mode {mode!r} is not supported; INSTRUCTOR and GTR use mean pooling")


def read_sentence_transformers(directory, dtype: Optional[str] = None, pooling_rule: Optional[str] = None,
                               hub_id: Optional[str] = None,
                               pooling_rule_source: str = "pooling_rule=") -> tuple[InstructorConfig, dict]:
    """(config, flat params as numpy) from a sentence-transformers INSTRUCTOR / GTR / sentence-T5 directory.

    The pooling rule is `pooling_rule` if given (`pooling_rule_source` names where it came from, for the
    log line), else decided from the evidence (`instructor_jax.checkpoints.pooling_evidence`; `hub_id` is the id the
    directory was downloaded as, if known).
    """
    directory = pathlib.Path(directory)
    layout = read_modules(directory)
    t5 = _read_json(layout.transformer / "config.json", "T5 model")
    numerics = {"dtype": dtype, "param_dtype": dtype} if dtype else {"param_dtype": t5.get("dtype") or t5.get("torch_dtype") or "float32"}
    if numerics["param_dtype"] not in ("float32", "bfloat16"):
        numerics = {"param_dtype": "float32"}
    encoder = encoder_config_from_t5(t5, str(layout.transformer / "config.json"), **numerics)
    st_config = {}
    if (layout.transformer / "sentence_bert_config.json").exists():
        st_config = _read_json(layout.transformer / "sentence_bert_config.json", "sentence-transformers model")
    max_seq_length = st_config.get("max_seq_length")
    if max_seq_length is None:  # sentence-transformers 6 keeps it in the tokenizer's config
        tok = layout.transformer / "tokenizer_config.json"
        length = _read_json(tok, "tokenizer").get("model_max_length") if tok.exists() else None
        max_seq_length = length if isinstance(length, int) and length < 1_000_000 else 512
    pooling = _read_json(layout.pooling / "config.json", "Pooling module")
    _check_mean_pooling(pooling, layout.pooling / "config.json")
    head = HeadConfig(dense_features=None, normalize=layout.normalize)
    if layout.dense is not None:
        dense = _read_json(layout.dense / "config.json", "Dense module")
        if dense.get("activation_function", IDENTITY_ACTIVATIONS[0]) not in IDENTITY_ACTIVATIONS:
            raise ValueError(f"{layout.dense / 'config.json'}: activation {dense['activation_function']!r} is not "
                             "supported; INSTRUCTOR's Dense has none (torch.nn.Identity)")
        if dense.get("in_features") != encoder.d_model:
            raise ValueError(f"{layout.dense / 'config.json'}: in_features {dense.get('in_features')} does not "
                             f"match the encoder's d_model {encoder.d_model}")
        head = dataclasses.replace(head, dense_features=int(dense["out_features"]), dense_bias=bool(dense.get("bias", True)))
    prompts = {}
    if (directory / "config_sentence_transformers.json").exists():
        prompts = _read_json(directory / "config_sentence_transformers.json", "model").get("prompts") or {}
    # Our own export writes this beside the files: it restores what sentence-transformers' files cannot say.
    recorded = InstructorConfig.load(directory).pooling_rule if (directory / NATIVE_CONFIG).exists() else None
    decision = decide_pooling_rule(directory, pooling, recorded_rule=recorded, hub_id=hub_id, override=pooling_rule,
                                   override_source=pooling_rule_source)
    pooling_log.info(decision.describe(directory))
    cfg = InstructorConfig(encoder=encoder, head=head, max_seq_length=int(max_seq_length),
                           do_lower_case=bool(st_config.get("do_lower_case", False)),
                           pooling_rule=decision.rule, prompts={k: v for k, v in prompts.items() if v})

    params = read_table(open_weights(layout.transformer), encoder_layout(encoder),
                         str(layout.transformer), dtype,
                         ignore=lambda n: n == TIED_EMBEDDING or n.startswith(IGNORED_PREFIXES))
    if layout.dense is not None:
        params.update(read_table(open_weights(layout.dense), dense_layout(cfg), str(layout.dense), dtype))
    return cfg, params


def write_sentence_transformers(directory, cfg: InstructorConfig, params: dict[str, np.ndarray],
                                tokenizer_dir, dtype: Optional[str] = None) -> None:
    """Writes a directory that plain `SentenceTransformer(directory)` loads and runs as this model does.

    The files follow the sentence-transformers 2-5 layout, which sentence-transformers 6 still reads.
    """
    directory = pathlib.Path(directory)
    dtype = dtype or cfg.encoder.param_dtype
    weights = {t.torch_name: cast(t.to_torch(params[t.jax_name]), dtype) for t in encoder_layout(cfg.encoder)}
    save_safetensors(directory / SAFETENSORS, weights)
    del weights
    pathlib.Path(directory, "config.json").write_text(json.dumps(
        t5_config_from_encoder(dataclasses.replace(cfg.encoder, param_dtype=dtype)), indent=2) + "\n")
    copy_tokenizer(tokenizer_dir, directory, model_max_length=cfg.max_seq_length)
    _write_json(directory / "sentence_bert_config.json",
                {"max_seq_length": cfg.max_seq_length, "do_lower_case": cfg.do_lower_case})
    _write_json(directory / "config_sentence_transformers.json", {
        "prompts": cfg.prompts, "default_prompt_name": None, "similarity_fn_name": "cosine"})
    modules = [("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling")]
    _write_json(directory / "1_Pooling/config.json", {
        "word_embedding_dimension": cfg.encoder.d_model, "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False, "include_prompt": cfg.pooling_rule == "none"})
    if cfg.head.dense_features is not None:
        modules.append(("2_Dense", "sentence_transformers.models.Dense"))
        _write_json(directory / "2_Dense/config.json", {
            "in_features": cfg.encoder.d_model, "out_features": cfg.head.dense_features,
            "bias": cfg.head.dense_bias, "activation_function": IDENTITY_ACTIVATIONS[0]})
        save_safetensors(directory / "2_Dense" / SAFETENSORS,
                         {t.torch_name: cast(t.to_torch(params[t.jax_name]), dtype) for t in dense_layout(cfg)})
    if cfg.head.normalize:
        modules.append((f"{len(modules)}_Normalize", "sentence_transformers.models.Normalize"))
        (directory / modules[-1][0]).mkdir()
    _write_json(directory / "modules.json", [
        {"idx": i, "name": str(i), "path": path, "type": kind} for i, (path, kind) in enumerate(modules)])
    # sentence-transformers has no setting for InstructorEmbedding's `n <= 1` rule; keep ours beside it.
    cfg.save(directory)


# ----------------------------------------------------------------------------------------------------
# Native directories
# ----------------------------------------------------------------------------------------------------

def is_native(directory) -> bool:
    return pathlib.Path(directory, NATIVE_CONFIG).exists() and pathlib.Path(directory, NATIVE_PARAMS).exists()


def read_native(directory, dtype: Optional[str] = None) -> tuple[InstructorConfig, dict[str, np.ndarray]]:
    directory = pathlib.Path(directory)
    cfg = InstructorConfig.load(directory)
    if dtype:
        # validate(): float16 is refused here, not at the first encode (nor saved into a model that cannot reload).
        cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, dtype=dtype, param_dtype=dtype).validate())
    # Native names map to themselves; shapes are checked against the table's Flax shapes.
    identity = native_layout(encoder_layout(cfg.encoder) + dense_layout(cfg))
    reader = open_weights(directory, stem="params")
    return cfg, read_table(reader, identity, str(directory / NATIVE_PARAMS), dtype)


# What our own writers put in a model directory (write_native, write_sentence_transformers), and so
# what --overwrite may replace: these files and nothing else.
_OWN_TOP_FILES = frozenset({NATIVE_CONFIG, NATIVE_PARAMS, SAFETENSORS, "config.json", "sentence_bert_config.json",
                            "config_sentence_transformers.json", "modules.json", *TOKENIZER_FILES})
_OWN_MODULE_FILES = {"Pooling": {"config.json"}, "Dense": {"config.json", SAFETENSORS}, "Normalize": set()}


def foreign_content(directory) -> Optional[str]:
    """None if `directory` is a model directory this program wrote (our files and nothing else), else why
    it is not: what `--overwrite` checks before it replaces a directory."""
    directory = pathlib.Path(directory)
    if not (directory / NATIVE_CONFIG).is_file():
        return f"it has no {NATIVE_CONFIG}, so it is not a model directory this program wrote"
    for path in sorted(directory.rglob("*")):
        name = path.relative_to(directory).as_posix()
        if path.is_symlink():
            return f"it holds a symbolic link, {name}"
        parts = name.split("/")
        module = parts[0].split("_", 1)
        if len(parts) == 1 and path.is_file() and name in _OWN_TOP_FILES:
            continue
        if not path.is_symlink() and t5x_checkpoint.is_t5x_export_path(name, path.is_dir()):
            continue
        if len(module) == 2 and module[0].isdigit() and module[1] in _OWN_MODULE_FILES:
            if len(parts) == 1 and path.is_dir():
                continue
            if len(parts) == 2 and path.is_file() and parts[1] in _OWN_MODULE_FILES[module[1]]:
                continue
        return f"it holds {name}, which is not a file this program writes"
    return None


def write_native(directory, cfg: InstructorConfig, params: dict[str, np.ndarray], tokenizer_dir) -> None:
    directory = pathlib.Path(directory)
    save_safetensors(directory / NATIVE_PARAMS, params, metadata={"format": "instructor-jax"})
    cfg.save(directory)
    copy_tokenizer(tokenizer_dir, directory, model_max_length=cfg.max_seq_length)


def _write_json(path: pathlib.Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


# ----------------------------------------------------------------------------------------------------
# Both ways
# ----------------------------------------------------------------------------------------------------

def read_any(directory, dtype: Optional[str] = None, pooling_rule: Optional[str] = None,
             hub_id: Optional[str] = None,
             pooling_rule_source: str = "pooling_rule=", tokenizer=None,
             t5x_settings=None) -> tuple[InstructorConfig, dict, pathlib.Path]:
    """(config, flat params, tokenizer directory) from a native, a sentence-transformers or a t5x directory.

    `pooling_rule` overrides the checkpoint's; see `read_sentence_transformers` for the other arguments.
    A t5x checkpoint holds no vocabulary: `tokenizer` is a tokenizer directory for it (needed unless our
    own t5x export put one beside it); `t5x_settings` (`t5x_checkpoint.T5xSettings`) says what its
    tensors cannot.
    """
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory} is not a directory")
    # Every file read below (weights, configs, tokenizer, model card) lies inside the directory.
    check_no_links_out(directory)
    is_t5x = not (directory / "modules.json").exists() and not is_native(directory) and \
        t5x_checkpoint.locate(directory) is not None
    if not is_t5x and (tokenizer is not None or (t5x_settings is not None and any(
            v is not None for v in dataclasses.astuple(t5x_settings)))):
        raise ValueError(f"{directory} is not a t5x checkpoint; --tokenizer and the t5x settings "
                         "(--relative_attention_max_distance, ...) apply to t5x checkpoints only")
    if is_t5x:
        tokenizer_dir = pathlib.Path(tokenizer) if tokenizer is not None else directory
        if not any((tokenizer_dir / name).exists() for name in ("tokenizer.json", "spiece.model")):
            raise ValueError(f"{directory} is a t5x checkpoint, which holds no vocabulary: give --tokenizer, a "
                             "tokenizer directory or a SentencePiece .model file (the published t5x_retrieval "
                             f"checkpoints use {t5x_checkpoint.PUBLISHED_VOCABULARY})")
        cfg, params = t5x_checkpoint.read_t5x(directory, t5x_settings or t5x_checkpoint.T5xSettings(), dtype,
                                              pooling_rule)
        return cfg, params, tokenizer_dir
    if (directory / "modules.json").exists():
        cfg, params = read_sentence_transformers(directory, dtype, pooling_rule, hub_id, pooling_rule_source)
        return cfg, params, read_modules(directory).transformer
    if is_native(directory):
        cfg, params = read_native(directory, dtype)
        if pooling_rule is not None:
            cfg = cfg.replace(pooling_rule=pooling_rule)
        return cfg, params, directory
    raise ValueError(f"{directory} is neither a sentence-transformers directory (modules.json) nor an "
                     f"instructor-jax one ({NATIVE_CONFIG} and {NATIVE_PARAMS}). For a plain transformers T5 "
                     "checkpoint, build a sentence-transformers model around it first")


def convert(source, destination, to: Optional[str] = None, dtype: Optional[str] = None,
            overwrite: bool = False, pooling_rule: Optional[str] = None, tokenizer=None,
            t5x_settings=None) -> str:
    """Converts `source` into `destination`; returns the direction taken ("jax", "pytorch" or "t5x").

    `source` is a directory or a hub id. The direction follows from the source unless `to` is given (sentence-transformers and t5x become
    instructor-jax, instructor-jax becomes sentence-transformers). For a t5x source, `tokenizer` is a
    tokenizer directory or SentencePiece .model file and `t5x_settings` what its tensors cannot say.
    `pooling_rule` overrides the one decided from the source's evidence (see
    `instructor_jax.checkpoints.pooling_evidence`); the output records the rule. The output is written to a temporary
    directory and renamed at the end: an interrupted conversion leaves no `destination` behind.
    """
    if dtype not in (None, "float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r} (T5 overflows in float16)")
    source, hub_id = resolve_model(source)  # a local directory, or a hub id fetched into the hub cache
    destination = pathlib.Path(destination)
    if source.resolve() == destination.resolve():
        raise ValueError("source and destination are the same directory")
    # Before reading anything: --overwrite replaces only a directory we wrote, never the source's tree.
    check_replaceable(destination, overwrite, foreign_content, protect=[source])
    inferred = "pytorch" if is_native(source) else "jax"
    to = to or inferred
    if to not in ("jax", "pytorch", "t5x"):
        raise ValueError(f"--to must be 'jax', 'pytorch' or 't5x', got {to!r}")
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:  # a tokenizer made from a .model file lives here
        if tokenizer is not None:
            tokenizer = t5x_checkpoint.tokenizer_directory(tokenizer, scratch)
        cfg, params, tokenizer_dir = read_any(source, dtype, pooling_rule, hub_id=hub_id,
                                              pooling_rule_source="--pooling_rule", tokenizer=tokenizer,
                                              t5x_settings=t5x_settings)
        with atomic_directory(destination, overwrite, foreign_content, protect=[source]) as staging:
            if to == "jax":
                write_native(staging, cfg, params, tokenizer_dir)
            elif to == "t5x":
                t5x_checkpoint.write_t5x(staging, cfg, params, tokenizer_dir, dtype)
            else:
                write_sentence_transformers(staging, cfg, params, tokenizer_dir, dtype)
    log.info("converted %s -> %s (%s)", source, destination, to)
    return to
