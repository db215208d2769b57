"""t5x checkpoints both ways, without t5x, Flax or TensorFlow.

t5x is not on the package registry (it pins a git Flax and needs TensorFlow), so this module reads and
writes its formats itself:

- the legacy layout: `checkpoint_<step>/checkpoint`, a msgpack file in flax.serialization's encoding
  ({"version": 3, "optimizer": {"target": params, "state": optimizer state}}), whose leaves are inline
  arrays (msgpack ext type 1: [shape, dtype name, C-order bytes]) or TensorStore specs naming a zarr
  directory beside the file (`target.encoder.layers_0.attention.query.kernel`);
- the Orbax layout newer t5x writes (`checkpoint_<step>/state/_METADATA`), read through orbax-checkpoint.

Parameter names are t5x_retrieval's dual encoder's (`token_embedder.embedding`, `encoder.layers_i...`,
`encoder.relpos_bias.rel_embedding`, `projection_layer.kernel`); they live in the one tensor table,
`tensor_table.encoder_layout` / `tensor_table.dense_layout` (`t5x_name`). Optimizer state is never read.

Like the rest of conversion this works on numpy and never imports JAX, except to read an Orbax-format
checkpoint: orbax-checkpoint imports JAX itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import re
from typing import Any, Optional

import numpy as np

from instructor_jax.model.config import NATIVE_CONFIG, EncoderConfig, HeadConfig, InstructorConfig
# A module, not names: convert imports this module too, and either may be imported first.
from instructor_jax.checkpoints import tensor_table, tokenizer_files
from instructor_jax.checkpoints.weights import WeightsError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint"  # t5x's msgpack file in a checkpoint_<step> directory
ORBAX_METADATA = "_METADATA"
VERSION = 3  # t5x.checkpoints.VERSION
# Where the published t5x_retrieval checkpoints' vocabulary lives (the checkpoints hold none).
PUBLISHED_VOCABULARY = "gs://t5-data/vocabs/cc_all.32000.100extra/sentencepiece.model"
# A full T5 (encoder-decoder) checkpoint's decoder has no place in an encoder: left out, not refused.
IGNORED_T5X_PREFIXES = ("decoder/",)
_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3  # flax.serialization._MsgpackExtType
_CHUNKED = "__msgpack_chunked_array__"  # flax's form of arrays over 1 GiB


class T5xError(WeightsError):
    """A t5x checkpoint that cannot be read as an encoder: says which tensor and why."""


# ----------------------------------------------------------------------------------------------------
# flax.serialization's msgpack encoding, in numpy (flax.serialization imports JAX)
# ----------------------------------------------------------------------------------------------------

def _dtype(name) -> np.dtype:
    name = name.decode() if isinstance(name, bytes) else name
    if name == "bfloat16":
        import ml_dtypes  # numpy has no bfloat16

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _ndarray_bytes(array: np.ndarray) -> bytes:
    import msgpack

    return msgpack.packb((array.shape, array.dtype.name, array.tobytes("C")), use_bin_type=True)


def _pack(value):
    import msgpack

    if isinstance(value, np.ndarray):
        return msgpack.ExtType(_EXT_NDARRAY, _ndarray_bytes(value))
    if isinstance(value, np.generic):
        return msgpack.ExtType(_EXT_NPSCALAR, _ndarray_bytes(np.asarray(value)))
    raise TypeError(f"cannot write a {type(value).__name__} into a t5x checkpoint")


def _unpack(code: int, data: bytes):
    import msgpack

    if code in (_EXT_NDARRAY, _EXT_NPSCALAR):
        shape, dtype, buffer = msgpack.unpackb(data, raw=True)
        array = np.frombuffer(buffer, dtype=_dtype(dtype)).reshape(shape)
        return array[()] if code == _EXT_NPSCALAR else array
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def msgpack_dumps(tree) -> bytes:
    """The bytes `flax.serialization.msgpack_serialize(tree)` gives for a dict tree of numpy arrays
    (arrays over flax's 1 GiB limit are not split: such tensors go to zarr here)."""
    import msgpack

    def sort(node):  # flax's tree_map rebuilds dicts with sorted keys
        return {k: sort(node[k]) for k in sorted(node)} if isinstance(node, dict) else node

    return msgpack.packb(sort(tree), default=_pack, strict_types=True)


def _unchunk(node):
    if isinstance(node, dict):
        if node.get(_CHUNKED):
            shape = tuple(node["shape"][str(i)] for i in range(len(node["shape"])))
            chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            return np.concatenate(chunks).reshape(shape)
        return {key: _unchunk(value) for key, value in node.items()}
    return node


def msgpack_loads(data: bytes):
    """What `flax.serialization.msgpack_restore(data)` gives, as numpy."""
    import msgpack

    return _unchunk(msgpack.unpackb(data, ext_hook=_unpack, raw=False, strict_map_key=False))


# ----------------------------------------------------------------------------------------------------
# Finding and reading a checkpoint
# ----------------------------------------------------------------------------------------------------

def _latest_step_directory(directory: pathlib.Path) -> Optional[pathlib.Path]:
    steps = [(int(m.group(1)), p) for p in directory.iterdir()
             if p.is_dir() and (m := re.fullmatch(r"checkpoint_(\d+)", p.name))]
    return max(steps)[1] if steps else None


def locate(path) -> Optional[tuple[str, pathlib.Path]]:
    """("msgpack", the checkpoint file) or ("orbax", the Orbax directory) for a t5x checkpoint at `path`
    (a `checkpoint_<step>` directory, its `checkpoint` file, or a model directory holding such
    directories: then the latest step, as t5x's `find_checkpoint` does); None if it is not one."""
    path = pathlib.Path(path)
    if path.is_file():
        return ("msgpack", path) if path.name == CHECKPOINT_FILE else None
    if not path.is_dir():
        return None
    if (path / CHECKPOINT_FILE).is_file():
        return "msgpack", path / CHECKPOINT_FILE
    for candidate in (path / "state", path):
        if (candidate / ORBAX_METADATA).is_file():
            return "orbax", candidate
    step = _latest_step_directory(path)
    return locate(step) if step is not None else None


def _is_spec(leaf) -> bool:
    return isinstance(leaf, dict) and "driver" in leaf and ("kvstore" in leaf or "path" in leaf)


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and not _is_spec(value):
            flat.update(_flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


class T5xReader:
    """The `target` tensors of a t5x checkpoint by "/"-joined name, read one at a time (the reader
    interface `convert._read_table` takes)."""

    def __init__(self, path):
        found = locate(path)
        if found is None:
            raise FileNotFoundError(f"{path} is not a t5x checkpoint: no {CHECKPOINT_FILE} (msgpack) file, no "
                                    f"Orbax {ORBAX_METADATA} and no checkpoint_<step> directory in it")
        self.kind, self.path = found
        self.directory = self.path.parent if self.kind == "msgpack" else self.path
        self.leaves = self._read_msgpack() if self.kind == "msgpack" else self._read_orbax()
        self.names = sorted(self.leaves)

    def _read_msgpack(self) -> dict[str, Any]:
        try:
            contents = msgpack_loads(self.path.read_bytes())
        except Exception as e:  # noqa: BLE001 - msgpack raises several kinds for a damaged file
            raise T5xError(f"{self.path} is not a readable t5x msgpack checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(contents, dict):
            raise T5xError(f"{self.path} holds a {type(contents).__name__}, not a t5x checkpoint's dict")
        # Version 0 files are the optimizer's state dict itself; later ones keep it under "optimizer".
        optimizer = contents.get("optimizer", contents)
        target = optimizer.get("target") if isinstance(optimizer, dict) else None
        if not isinstance(target, dict):
            raise T5xError(f"{self.path} has no optimizer.target (the model's parameters); keys: "
                           f"{sorted(contents)}")
        return _flatten(target)

    def _read_orbax(self) -> dict[str, Any]:
        # orbax-checkpoint imports JAX: the one place conversion does.
        import orbax.checkpoint as ocp

        checkpointer = ocp.PyTreeCheckpointer()
        metadata = checkpointer.metadata(self.path)
        tree = getattr(metadata, "item_metadata", None) or metadata
        tree = getattr(tree, "tree", tree)
        if not isinstance(tree, dict) or not isinstance(tree.get("target"), dict):
            raise T5xError(f"{self.path} (Orbax) has no 'target' (the model's parameters); top-level keys: "
                           f"{sorted(tree) if isinstance(tree, dict) else type(tree).__name__}")
        self._orbax = (checkpointer, tree)
        return {name: None for name in _flatten(tree["target"])}

    def _orbax_target(self) -> dict[str, np.ndarray]:
        if not hasattr(self, "_orbax_arrays"):
            import jax
            import orbax.checkpoint as ocp

            checkpointer, tree = self._orbax
            target = {"target": tree["target"]}
            # Only the parameters: optimizer state is neither needed nor read.
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            restored = checkpointer.restore(self.path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True))
            self._orbax_arrays = {k: np.asarray(v) for k, v in _flatten(restored["target"]).items()}
        return self._orbax_arrays

    def _spec(self, name: str) -> dict:
        spec = json.loads(json.dumps(self.leaves[name]))
        kvstore = spec.get("kvstore")
        if isinstance(kvstore, dict) and kvstore.get("driver") in ("file", "gfile") and "path" in kvstore:
            # Paths are relative to the checkpoint directory; "gfile" is TensorFlow's name for a file.
            kvstore["driver"] = "file"
            kvstore["path"] = str(self.directory / kvstore["path"])
        elif isinstance(kvstore, dict) and kvstore.get("driver") == "gcs":
            # Written to a bucket, read here from a copy: the zarr directory lies beside the msgpack file.
            spec["kvstore"] = {"driver": "file", "path": str(self.directory / (kvstore.get("path") or spec.pop("path")))}
            spec.pop("path", None)
        else:
            raise T5xError(f"tensor {self.describe(name)} names a TensorStore location instructor-jax cannot "
                           f"read: {json.dumps(kvstore)}")
        # What t5x's _read_ts drops too: a copy may have been re-chunked or re-compressed.
        for key in ("chunks", "compressor"):
            spec.get("metadata", {}).pop(key, None)
        return spec

    def shape(self, name: str) -> tuple[int, ...]:
        leaf = self.leaves[name]
        if isinstance(leaf, np.ndarray):
            return tuple(leaf.shape)
        if self.kind == "orbax":
            return tuple(self._orbax_target()[name].shape)
        if _is_spec(leaf) and "shape" in leaf.get("metadata", {}):
            return tuple(leaf["metadata"]["shape"])
        return tuple(self.get(name).shape)

    def get(self, name: str) -> np.ndarray:
        leaf = self.leaves[name]
        if self.kind == "orbax":
            return self._orbax_target()[name]
        if isinstance(leaf, np.ndarray):
            return leaf
        if not _is_spec(leaf):
            raise T5xError(f"tensor {self.describe(name)} is a {type(leaf).__name__}, neither an array nor a "
                           "TensorStore spec")
        import tensorstore as ts

        spec = self._spec(name)
        try:
            return np.asarray(ts.open(spec, open=True, read=True).result().read().result())
        except Exception as e:  # noqa: BLE001 - tensorstore reports a missing or damaged zarr as ValueError
            raise T5xError(f"cannot read tensor {self.describe(name)}: {_first_line(e)}") from None

    def describe(self, name: str) -> str:
        leaf = self.leaves[name]
        if _is_spec(leaf):
            location = (leaf.get("kvstore") or {}).get("path") or leaf.get("path")
            return f"target/{name} of {self.path} (zarr {self.directory / str(location)})"
        return f"target/{name} of {self.path}"


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


# ----------------------------------------------------------------------------------------------------
# t5x -> instructor-jax
# ----------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class T5xSettings:
    """What a t5x checkpoint's tensors cannot say; None takes t5x's default (or what an
    instructor_jax.json beside the checkpoint, written by our export, records)."""

    relative_attention_max_distance: Optional[int] = None  # t5x / flaxformer: 128
    layer_norm_epsilon: Optional[float] = None  # flaxformer's T5LayerNorm: 1e-6
    # The activation; gated or not follows from the tensors (mlp/wi vs mlp/wi_0 + wi_1). t5x's
    # defaults: "relu" (T5 1.0, GTR, sentence-T5), "gated-gelu" (T5 1.1).
    feed_forward_proj: Optional[str] = None
    max_seq_length: Optional[int] = None  # 512
    normalize: Optional[bool] = None  # t5x_retrieval's L2Norm: True


T5X_DEFAULTS = {"relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6, "max_seq_length": 512,
                "normalize": True}


def _names(cfg: EncoderConfig) -> dict[str, str]:
    """our name -> t5x name, from the one table."""
    return {t.jax_name: t.t5x_name for t in tensor_table.encoder_layout(cfg)}


def _need(reader: T5xReader, name: str, what: str) -> tuple[int, ...]:
    if name not in reader.leaves:
        raise T5xError(f"{reader.path} lacks tensor target/{name} ({what}), so its encoder's shape cannot be "
                       "inferred; is it a T5 encoder or t5x_retrieval dual encoder checkpoint?")
    return reader.shape(name)


def infer_config(reader: T5xReader, settings: T5xSettings = T5xSettings(), dtype: Optional[str] = None,
                 pooling_rule: Optional[str] = None) -> InstructorConfig:
    """The encoder's shape from the tensors (width, heads, head size, feed-forward size and kind, layers,
    buckets); the rest from `settings`, then a recorded instructor_jax.json, then t5x's defaults."""
    recorded = InstructorConfig.load(reader.directory) if (reader.directory / NATIVE_CONFIG).is_file() else None
    probe = _names(EncoderConfig(num_layers=1))
    gated_probe = _names(EncoderConfig(num_layers=1, feed_forward_proj="gated-gelu"))
    vocab, d = _need(reader, probe["encoder/token_embedder"], "the token embedding")
    heads, buckets = _need(reader, probe["encoder/relpos_bias/rel_embedding"], "the relative position bias")
    query = probe["encoder/layers_0/attention/query"]
    d_in, width = _need(reader, query, "layer 0's attention")
    if width % heads:
        raise T5xError(f"tensor {reader.describe(query)} has {width} columns, not a multiple of the "
                       f"{heads} heads target/{probe['encoder/relpos_bias/rel_embedding']} has")
    gated = gated_probe["encoder/layers_0/mlp/wi_0"] in reader.leaves
    d_ff = _need(reader, probe["encoder/layers_0/mlp/wo"], "layer 0's feed-forward output")[0]
    # Layers are counted from the names; a gap or a missing tensor is then named by _read_table.
    layer = re.compile(r"encoder/layers_(\d+)/")
    num_layers = 1 + max(int(m.group(1)) for name in reader.names if (m := layer.match(name)))
    per_layer_bias = [n for n in reader.names if re.match(r"encoder/layers_\d+/relpos_bias/", n)]
    if per_layer_bias:
        raise T5xError(f"tensor target/{per_layer_bias[0]}: a relative position bias per layer is not supported; "
                       "T5 and GTR share one (encoder/relpos_bias)")

    def setting(name: str, from_recorded):
        value = getattr(settings, name)
        if value is None and recorded is not None:
            value = from_recorded(recorded)
        return T5X_DEFAULTS[name] if value is None else value

    ffn = settings.feed_forward_proj
    if ffn is None and recorded is not None:
        ffn = recorded.encoder.feed_forward_proj
    ffn = ffn or ("gated-gelu" if gated else "relu")
    if ffn.startswith("gated-") != gated:
        raise T5xError(f"feed_forward_proj {ffn!r} is {'' if ffn.startswith('gated-') else 'not '}gated, but "
                       f"{reader.path} has {'mlp/wi_0 and mlp/wi_1' if gated else 'mlp/wi'}; use "
                       f"{'gated-ACT' if gated else 'ACT'} (e.g. {'gated-gelu' if gated else 'relu'})")
    stored = np.dtype(reader.get(probe["encoder/encoder_norm/scale"]).dtype).name \
        if probe["encoder/encoder_norm/scale"] in reader.leaves else "float32"
    param_dtype = dtype or (stored if stored in ("float32", "bfloat16") else "float32")
    encoder = EncoderConfig(
        vocab_size=vocab, d_model=d, d_kv=width // heads, d_ff=d_ff, num_layers=num_layers, num_heads=heads,
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=int(setting("relative_attention_max_distance",
                                                    lambda r: r.encoder.relative_attention_max_distance)),
        layer_norm_epsilon=float(setting("layer_norm_epsilon", lambda r: r.encoder.layer_norm_epsilon)),
        feed_forward_proj=ffn, param_dtype=param_dtype, **({"dtype": dtype} if dtype else {}),
        **({"dropout_rate": recorded.encoder.dropout_rate} if recorded else {}))
    try:
        encoder = encoder.validate()
    except ValueError as e:
        raise T5xError(f"{reader.path}: {e}") from None
    if d_in != d:
        raise T5xError(f"tensor {reader.describe(query)} has {d_in} rows; "
                       f"target/{probe['encoder/token_embedder']} says the width is {d}")
    projection = {t.jax_name: t.t5x_name for t in tensor_table.dense_layout(InstructorConfig(
        encoder, HeadConfig(dense_features=1, dense_bias=True)))}
    dense_features = reader.shape(projection["dense/kernel"])[-1] if projection["dense/kernel"] in reader.leaves else None
    head = HeadConfig(dense_features=dense_features,
                      dense_bias=dense_features is not None and projection["dense/bias"] in reader.leaves,
                      normalize=bool(setting("normalize", lambda r: r.head.normalize)))
    # t5x_retrieval pools every non-padding token: the instruction too, i.e. "none".
    rule = pooling_rule or (recorded.pooling_rule if recorded else "none")
    return InstructorConfig(encoder=encoder, head=head,
                            max_seq_length=int(setting("max_seq_length", lambda r: r.max_seq_length)),
                            do_lower_case=recorded.do_lower_case if recorded else False, pooling_rule=rule,
                            prompts=dict(recorded.prompts) if recorded else {})


def read_t5x(path, settings: T5xSettings = T5xSettings(), dtype: Optional[str] = None,
             pooling_rule: Optional[str] = None) -> tuple[InstructorConfig, dict[str, np.ndarray]]:
    """(config, flat params as numpy) from a t5x checkpoint; optimizer state is not read."""
    reader = T5xReader(path)
    cfg = infer_config(reader, settings, dtype, pooling_rule)
    table = tensor_table.t5x_layout(tensor_table.encoder_layout(cfg.encoder) + tensor_table.dense_layout(cfg))
    params = tensor_table.read_table(reader, table, f"{reader.path} (target)", dtype,
                         ignore=lambda n: n.startswith(IGNORED_T5X_PREFIXES),
                         hint="Is every layer there, and is it a t5x_retrieval dual encoder or T5 encoder?")
    log.info("read t5x checkpoint %s: %d layers, d_model %d, %d heads of %d, d_ff %d (%s), %d buckets, dense %s",
             reader.path, cfg.encoder.num_layers, cfg.encoder.d_model, cfg.encoder.num_heads, cfg.encoder.d_kv,
             cfg.encoder.d_ff, cfg.encoder.feed_forward_proj, cfg.encoder.relative_attention_num_buckets,
             cfg.head.dense_features)
    return cfg, params


# ----------------------------------------------------------------------------------------------------
# instructor-jax -> t5x
# ----------------------------------------------------------------------------------------------------

# t5x's tensorstore chunks aim at this many bytes (t5x.checkpoints._DESIRED_CHUNK_SIZE_BYTES).
_CHUNK_BYTES = 64 * 1024 * 1024


def _chunks(shape: tuple[int, ...], itemsize: int) -> list[int]:
    """Whole rows of the first axis, about _CHUNK_BYTES a chunk."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * itemsize
    return [max(1, min(shape[0], _CHUNK_BYTES // max(row, 1))), *shape[1:]]


def _zarr_dtype(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else dtype.str


def _write_zarr(directory: pathlib.Path, name: str, array: np.ndarray) -> dict:
    """Writes `array` as t5x does (zarr v2, gzip) and returns the spec t5x keeps in the msgpack file."""
    import tensorstore as ts

    relative = "target." + name.replace("/", ".")
    metadata = {"chunks": _chunks(array.shape, array.dtype.itemsize), "compressor": {"id": "gzip", "level": 1},
                "dtype": _zarr_dtype(array.dtype), "shape": list(array.shape)}
    spec = {"driver": "zarr", "kvstore": {"driver": "file", "path": relative}, "metadata": metadata}
    store = ts.open({**spec, "kvstore": {"driver": "file", "path": str(directory / relative)}},
                    create=True, open=False).result()
    store.write(array).result()
    return spec


def write_t5x(directory, cfg: InstructorConfig, params: dict[str, np.ndarray], tokenizer_dir=None,
              dtype: Optional[str] = None, step: int = 0) -> None:
    """Writes a legacy t5x checkpoint directory (what t5x's `load_t5x_checkpoint` and a t5x_retrieval
    run's `RestoreCheckpointConfig(path=...)` read): the msgpack `checkpoint` file with our parameters under
    `target`, tensors of two or more dimensions in zarr directories beside it and the rest inline, as t5x
    writes them. Optimizer state is not written (restore with `fallback_to_scratch=True`).
    `instructor_jax.json` and the tokenizer files go beside, so that converting back restores what t5x
    cannot hold (the pooling rule, max_seq_length, prompts)."""
    directory = pathlib.Path(directory)
    dtype = dtype or cfg.encoder.param_dtype
    target: dict = {}
    for entry in tensor_table.t5x_layout(tensor_table.encoder_layout(cfg.encoder) + tensor_table.dense_layout(cfg)):
        array = tensor_table.cast(entry.to_torch(params[entry.jax_name]), dtype)
        node = target
        *parents, leaf = entry.t5x_name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _write_zarr(directory, entry.t5x_name, array) if array.ndim >= 2 else array
    contents = {"version": VERSION, "optimizer": {"target": target,
                                                   "state": {"step": np.asarray(step, np.int32)}}}
    (directory / CHECKPOINT_FILE).write_bytes(msgpack_dumps(contents))
    cfg = cfg.replace(encoder=dataclasses.replace(cfg.encoder, param_dtype=dtype))
    cfg.save(directory)
    if tokenizer_dir is not None:
        tokenizer_files.copy_tokenizer(tokenizer_dir, directory, model_max_length=cfg.max_seq_length)


def is_t5x_export_path(relative: str, is_dir: bool) -> bool:
    """Whether a path inside a directory is one `write_t5x` writes (what --overwrite may replace)."""
    parts = relative.split("/")
    if not parts[0].startswith("target."):
        return not is_dir and parts == [CHECKPOINT_FILE]
    if len(parts) == 1:
        return is_dir
    return len(parts) == 2 and not is_dir and (parts[1] == ".zarray" or re.fullmatch(r"\d+(\.\d+)*", parts[1]) is not None)


# ----------------------------------------------------------------------------------------------------
# Tokenizers for t5x checkpoints
# ----------------------------------------------------------------------------------------------------

def tokenizer_directory(tokenizer, staging) -> pathlib.Path:
    """A tokenizer directory for `tokenizer`: itself if it is one, else (a SentencePiece .model file, as
    t5x's seqio vocabularies are) one made in `staging` with transformers' T5 converter: T5's special
    tokens and its 100 <extra_id_*> sentinels, as the published vocabulary has."""
    tokenizer, staging = pathlib.Path(tokenizer), pathlib.Path(staging)
    if tokenizer.is_dir():
        return tokenizer
    if not tokenizer.is_file():
        raise FileNotFoundError(f"--tokenizer {tokenizer} is neither a tokenizer directory nor a SentencePiece "
                                f".model file (the published t5x checkpoints use {PUBLISHED_VOCABULARY})")
    import shutil

    from transformers import T5Tokenizer

    source = staging / "sentencepiece"
    source.mkdir(parents=True)
    shutil.copyfile(tokenizer, source / "spiece.model")
    try:
        # from_pretrained, not T5Tokenizer(vocab_file=...): the latter silently maps everything to <unk>.
        converted = T5Tokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - sentencepiece and transformers raise many kinds
        raise ValueError(f"--tokenizer {tokenizer} is not a SentencePiece model: {_first_line(e)}") from None
    out = staging / "tokenizer"
    converted.save_pretrained(str(out))
    shutil.copyfile(tokenizer, out / "spiece.model")  # seqio reads this file; keep it with the model
    return out
