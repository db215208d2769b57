"""`MTEBEncoder`: an `Instructor` as an mteb 2.x model (mteb's `EncoderProtocol`, through `AbsEncoder`)."""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # the extra is missing, or Python is older than mteb 2.x allows
    import sys

    raise ImportError(f"evaluation needs mteb 2.x (Python >= 3.11; this is {sys.version.split()[0]}): "
                      f"pip install 'instructor-jax[mteb]' ({e})") from e

from instructor_jax.evaluation.instructions import instruction_for, load_instructions
from instructor_jax.evaluation.tasks import own_instruction

log = logging.getLogger(__name__)


class MTEBEncoder(AbsEncoder):
    """Embeds mteb's inputs with `Instructor.encode` (bucketing, sharding), each task with its INSTRUCTOR
    instruction.

    `instructions`: a model name of the reference's table ("hkunlp/instructor-large"), a JSON file (same
    shape) or a dict; tasks it lacks use their own (local tasks' task.json), else `default_instruction`,
    else the run stops naming the task. `use_instructions=False` embeds every text with no instruction (the
    ablation). Retrieval and reranking get the query instruction for `PromptType.query` and the corpus one
    for documents, which mteb hands over as `(title + " " + text).strip()`, as the reference joined them.
    """

    def __init__(self, model, instructions=None, *, default_instruction: Optional[str] = None,
                 use_instructions: bool = True, batch_size: int = 32, dtype: Optional[str] = None,
                 name: Optional[str] = None):
        self.model = model
        self.instructions = load_instructions(instructions)
        self.default_instruction = default_instruction
        self.use_instructions = use_instructions
        self.batch_size = batch_size
        self.dtype = dtype
        self.used = {}  # (task, prompt type) -> instruction, for the summary
        # Without mteb_model_meta, mteb.evaluate swaps in an empty model and never calls this one.
        source = getattr(model, "source", None)
        self.mteb_model_meta = ModelMeta.create_empty(overwrites=dict(
            name=name or f"instructor-jax/{getattr(source, 'name', None) or 'model'}", revision="local",
            loader=None, framework=["JAX"], similarity_fn_name=ScoringFunction.COSINE, embed_dim=model.dim,
            max_tokens=model.config.max_seq_length, use_instructions=use_instructions,
            languages=["eng-Latn"], open_weights=True))

    def instruction(self, task_metadata, prompt_type) -> str:
        if not self.use_instructions:
            return ""
        kind = prompt_type.value if isinstance(prompt_type, PromptType) else prompt_type
        return instruction_for(self.instructions, task_metadata.name, kind, own_instruction(task_metadata),
                               self.default_instruction)

    def check_tasks(self, tasks) -> None:
        """Raises before any work if a task has no instruction (aggregates: each of their tasks)."""
        for task in tasks:
            for sub in getattr(task, "tasks", None) or [task]:
                for kind in ("query", "document"):
                    self.instruction(sub.metadata, kind)

    def encode(self, inputs, *, task_metadata, hf_split, hf_subset, prompt_type=None, **kwargs) -> np.ndarray:
        instruction = self.instruction(task_metadata, prompt_type)
        key = (task_metadata.name, prompt_type.value if isinstance(prompt_type, PromptType) else None)
        self.used.setdefault(key, instruction)
        texts = [text for batch in inputs for text in batch["text"]]
        return self.model.encode(texts, instruction=instruction, batch_size=kwargs.get("batch_size") or self.batch_size,
                                 dtype=self.dtype, show_progress_bar=False)


def instructions_as_prompts(encoder: MTEBEncoder, tasks) -> dict:
    """mteb's model_prompts ({"Task-query": ..., "Task-document": ..., "Task": ...}) giving a
    sentence-transformers model the instructions this encoder uses: the same protocol, run by mteb's own
    SentenceTransformerEncoderWrapper."""
    prompts = {}
    for task in tasks:
        for sub in getattr(task, "tasks", None) or [task]:
            meta = sub.metadata
            prompts[f"{meta.name}-query"] = encoder.instruction(meta, "query")
            prompts[f"{meta.name}-document"] = encoder.instruction(meta, "document")
            prompts[meta.name] = encoder.instruction(meta, None)
    return prompts
