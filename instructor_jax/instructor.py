"""`Instructor`: load a model, encode [instruction, text] pairs, save it, export it to PyTorch.

    from instructor_jax import Instructor
    model = Instructor.from_pretrained("hkunlp/instructor-large")   # or a local directory
    embeddings = model.encode([["Represent the Wikipedia question for retrieving supporting documents: ",
                                "where is the food stored in a yam plant"]])
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import pathlib
import tempfile
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from instructor_jax.checkpoints import convert, tensor_table
from instructor_jax.runtime import sharding
from instructor_jax.model.config import ATTENTION_NAMES, InstructorConfig
from instructor_jax.encode.batch_encoder import BatchEncoder
from instructor_jax.runtime.fileio import atomic_directory
from instructor_jax.checkpoints.hub import resolve_model, resolve_model_path  # noqa: F401  (resolve_model_path: API)
from instructor_jax.model.tokenization import InstructionTokenizer, check_bucket_values, default_buckets

log = logging.getLogger(__name__)

class Instructor:
    """An INSTRUCTOR (or GTR / sentence-T5) embedder: parameters on device plus its tokenizer."""

    def __init__(self, config: InstructorConfig, params, tokenizer, source: Optional[pathlib.Path] = None):
        self.config = config
        self.params = params
        self.tokenizer = InstructionTokenizer(tokenizer, **config.tokenizer_settings())
        self.source = source
        self.buckets = default_buckets(config.max_seq_length)
        self._encoder: Optional[BatchEncoder] = None

    @property
    def batch_encoder(self) -> BatchEncoder:
        # Built on first use: constructing it places the parameters on every local device.
        if self._encoder is None:
            self._encoder = BatchEncoder(self.config, self.params)
        return self._encoder

    @property
    def compile_count(self) -> int:
        """Programs compiled by `encode` so far (at most one per bucket, dtype and normalize setting)."""
        return 0 if self._encoder is None else self._encoder.compile_count

    # ----------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, name_or_path, dtype: Optional[str] = None,
                        pooling_rule: Optional[str] = None, attention: Optional[str] = None) -> "Instructor":
        """Loads a sentence-transformers INSTRUCTOR / GTR / sentence-T5 directory, an instructor-jax one,
        or a hub id. `dtype` ("float32", "bfloat16") sets both parameter and compute precision.

        The pooling rule (whether the instruction's tokens are pooled) is decided from evidence: what the
        files state, else the model's identity (hub id, hub-cache path, model card), else INSTRUCTOR's
        rule, as InstructorEmbedding's `INSTRUCTOR(path)` applies it; one log line says which and why
        (see instructor_jax.checkpoints.pooling_evidence). `pooling_rule` overrides it ("instructor",
        "sentence-transformers" or "none"; see instructor_jax.model.tokenization). `attention` sets how
        `encode` computes attention by default (see `encode`)."""
        path, hub_id = resolve_model(name_or_path)
        config, flat, tokenizer_dir = convert.read_any(path, dtype, pooling_rule=pooling_rule, hub_id=hub_id)
        tokenizer = InstructionTokenizer.from_directory(tokenizer_dir).tokenizer
        params = tensor_table.unflatten_params({k: jnp.asarray(v) for k, v in flat.items()})
        if attention is not None:
            config = config.replace(encoder=dataclasses.replace(config.encoder, attention=attention).validate())
        return cls(config, params, tokenizer, source=tokenizer_dir)

    # ----------------------------------------------------------------------------------------------
    def encode(self, inputs: Sequence, instruction: Optional[str] = None, batch_size: int = 32,
               normalize: bool = True, show_progress_bar: Optional[bool] = None, dtype: Optional[str] = None,
               buckets: Optional[Sequence[int]] = None, packing: Optional[bool] = None,
               attention: Optional[str] = None) -> np.ndarray:
        """Embeds [instruction, text] pairs (or texts with one `instruction`); float32 [n, dim], input order.

        `normalize=False` returns the embeddings before the final L2 norm. `dtype="bfloat16"` computes in
        bfloat16 (default: the model's dtype). `batch_size` is rows per batch, rounded up to a multiple of
        the number of devices the batch is split over: the local devices (on a CPU-only machine, the
        several CPU devices `import instructor_jax` asked for, see `instructor_jax.runtime.host_devices`).

        `packing`: None (default) packs several inputs into each row where that computes fewer FLOPs than
        padding each input to its length bucket, True always packs, False never does. Packed, an input's
        embedding depends on its neighbours only through float rounding (~1e-7); unpacked, it depends
        on nothing else in the call. Programs compiled: unpacked, at most one per bucket and row count
        (`batch_size` and the num_devices x 2^k below it); packed, one per row length (3, see
        `instructor_jax.model.packing`) and row count. `buckets` are the unpacked padded lengths (default:
        `tokenization.default_buckets`).

        `attention`: how attention is computed (default: the model's, "xla"): "cudnn" on NVIDIA GPUs in
        bfloat16, "pallas_tpu" on TPUs, "auto" for what the device checks measured faster (today xla);
        see docs/attention.md. One compiled program per setting, as for dtype.
        """
        if instruction is not None:
            if isinstance(inputs, str):
                inputs = [inputs]
            inputs = [[instruction, text] for text in inputs]
        if dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r} (T5 overflows in float16)")
        buckets = self.buckets if buckets is None else check_bucket_values(buckets)  # [] is no default
        if buckets[-1] < self.config.max_seq_length:
            raise ValueError(f"the largest bucket ({buckets[-1]}) must be at least max_seq_length "
                             f"({self.config.max_seq_length})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if attention not in (None, *ATTENTION_NAMES):
            raise ValueError(f"attention must be one of {ATTENTION_NAMES}, got {attention!r}")
        tokenized = self.tokenizer.tokenize(inputs)
        if show_progress_bar is None:
            show_progress_bar = len(tokenized.input_ids) > 10 * batch_size
        return self.batch_encoder.encode(tokenized, batch_size, buckets, normalize=normalize, dtype=dtype,
                                         show_progress_bar=show_progress_bar, packing_mode=packing,
                                         attention=attention)

    # ----------------------------------------------------------------------------------------------
    def _flat_numpy_params(self) -> dict:
        return tensor_table.flatten_params(sharding.gather_to_host(self.params))

    @contextlib.contextmanager
    def _tokenizer_files(self):
        """The directory of tokenizer files to copy: the source's, or a fresh save of the tokenizer."""
        if self.source is not None and self.source.is_dir():
            yield self.source
            return
        with tempfile.TemporaryDirectory() as tmp:
            self.tokenizer.tokenizer.save_pretrained(tmp)
            yield pathlib.Path(tmp)

    def save_pretrained(self, directory, overwrite: bool = False) -> None:
        """Writes the native format (instructor_jax.json, params.safetensors, tokenizer files). With
        `overwrite`, an existing `directory` is replaced only if it is a model directory this program wrote."""
        self.config.encoder.validate()  # a config that from_pretrained would refuse is never written
        with self._tokenizer_files() as tokenizer_dir, \
                atomic_directory(directory, overwrite, convert.foreign_content) as staging:
            convert.write_native(staging, self.config, self._flat_numpy_params(), tokenizer_dir)

    def export_sentence_transformers(self, directory, overwrite: bool = False, prompts: Optional[dict] = None) -> None:
        """Writes a directory that `sentence_transformers.SentenceTransformer(directory)` loads; its
        `encode(texts, prompt=instruction)` reproduces this model's embeddings."""
        config = self.config.replace(prompts={**self.config.prompts, **(prompts or {})})
        config.encoder.validate()
        with self._tokenizer_files() as tokenizer_dir, \
                atomic_directory(directory, overwrite, convert.foreign_content) as staging:
            convert.write_sentence_transformers(staging, config, self._flat_numpy_params(), tokenizer_dir)

    @property
    def dim(self) -> int:
        return self.config.output_dim
