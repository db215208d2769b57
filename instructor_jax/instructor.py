"""`Instructor`: load a model, encode [instruction, text] pairs, save it, export it to PyTorch.

    from instructor_jax import Instructor
    model = Instructor.from_pretrained("hkunlp/instructor-large")   # or a local directory
    embeddings = model.encode([["Represent the Wikipedia question for retrieving supporting documents: ",
                                "where is the food stored in a yam plant"]])
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
import re
import tempfile
from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from instructor_jax import convert, sharding
from instructor_jax.config import InstructorConfig
from instructor_jax.encoding import BatchEncoder
from instructor_jax.fileio import atomic_directory
from instructor_jax.tokenization import InstructionTokenizer, default_buckets

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_FILES = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt"]


def resolve_model_path(name_or_path) -> pathlib.Path:
    """A local directory as is; a hub id ("hkunlp/instructor-large") fetched with huggingface_hub."""
    path = pathlib.Path(name_or_path).expanduser()
    if path.exists():
        return path
    if not HUB_ID.match(str(name_or_path)):
        raise FileNotFoundError(f"{name_or_path} is neither a local directory nor a hub id like "
                                "'hkunlp/instructor-large'")
    try:
        from huggingface_hub import snapshot_download

        # A .bin is fetched only where no safetensors exists; allow_patterns cannot express that, so
        # take both (the hkunlp repositories hold only .bin files).
        return pathlib.Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES))
    except Exception as e:  # offline, unknown repo, gated repo, ...: one message with the way out
        raise OSError(f"could not fetch {name_or_path} from the Hugging Face hub ({type(e).__name__}: {e}). "
                      "If this machine is offline, download the model on one that is online "
                      f"(`huggingface-cli download {name_or_path} --local-dir DIR`), copy DIR here and pass "
                      "its path instead of the hub id") from e


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
                        pooling_rule: Optional[str] = None) -> "Instructor":
        """Loads a sentence-transformers INSTRUCTOR / GTR / sentence-T5 directory, an instructor-jax one,
        or a hub id. `dtype` ("float32", "bfloat16") sets both parameter and compute precision;
        `pooling_rule` overrides the one read from the checkpoint (see instructor_jax.tokenization)."""
        path = resolve_model_path(name_or_path)
        config, flat, tokenizer_dir = convert.read_any(path, dtype)
        if pooling_rule is not None:
            config = config.replace(pooling_rule=pooling_rule)
        tokenizer = InstructionTokenizer.from_directory(tokenizer_dir).tokenizer
        params = convert.unflatten_params({k: jnp.asarray(v) for k, v in flat.items()})
        return cls(config, params, tokenizer, source=tokenizer_dir)

    # ----------------------------------------------------------------------------------------------
    def encode(self, inputs: Sequence, instruction: Optional[str] = None, batch_size: int = 32,
               normalize: bool = True, show_progress_bar: Optional[bool] = None, dtype: Optional[str] = None,
               buckets: Optional[Sequence[int]] = None) -> np.ndarray:
        """Embeds [instruction, text] pairs (or texts with one `instruction`); float32 [n, dim], input order.

        `normalize=False` returns the embeddings before the final L2 norm. `dtype="bfloat16"` computes in
        bfloat16 (default: the model's dtype). `buckets` are the padded lengths (default: see
        `encoding.default_buckets`); at most one program is compiled per bucket. An input's embedding does
        not depend on the other inputs or on `batch_size`, which is rounded up to a multiple of the
        number of local devices.
        """
        if instruction is not None:
            if isinstance(inputs, str):
                inputs = [inputs]
            inputs = [[instruction, text] for text in inputs]
        buckets = tuple(sorted(buckets or self.buckets))
        if buckets[-1] < self.config.max_seq_length:
            raise ValueError(f"the largest bucket ({buckets[-1]}) must be at least max_seq_length "
                             f"({self.config.max_seq_length})")
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        tokenized = self.tokenizer.tokenize(inputs)
        if show_progress_bar is None:
            show_progress_bar = len(tokenized.input_ids) > 10 * batch_size
        return self.batch_encoder.encode(tokenized, batch_size, buckets, normalize=normalize, dtype=dtype,
                                         show_progress_bar=show_progress_bar)

    # ----------------------------------------------------------------------------------------------
    def _flat_numpy_params(self) -> dict:
        return convert.flatten_params(sharding.gather_to_host(self.params))

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
        """Writes the native format (instructor_jax.json, params.safetensors, tokenizer files)."""
        with self._tokenizer_files() as tokenizer_dir, atomic_directory(directory, overwrite) as staging:
            convert.write_native(staging, self.config, self._flat_numpy_params(), tokenizer_dir)

    def export_sentence_transformers(self, directory, overwrite: bool = False, prompts: Optional[dict] = None) -> None:
        """Writes a directory that `sentence_transformers.SentenceTransformer(directory)` loads; its
        `encode(texts, prompt=instruction)` reproduces this model's embeddings."""
        config = self.config.replace(prompts={**self.config.prompts, **(prompts or {})})
        with self._tokenizer_files() as tokenizer_dir, atomic_directory(directory, overwrite) as staging:
            convert.write_sentence_transformers(staging, config, self._flat_numpy_params(), tokenizer_dir)

    @property
    def dim(self) -> int:
        return self.config.output_dim
