"""Request bodies (pydantic) and their conversion to [instruction, text] pairs; response bodies as bytes.

OpenAI's /v1/embeddings takes `input` (a string or a list of strings) and INSTRUCTOR's extensions, which
the OpenAI client sends through `extra_body`: `instruction` (one for every input), `instructions` (one per
input) or `prompt_name` (+ `prompt_type`). text-embeddings-inference's /embed takes `inputs` (a string, a
list of strings, or a list of [instruction, text] pairs). Unknown fields are refused: a misspelt
`instrucion` would otherwise give embeddings without the instruction, silently.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict

from instructor_jax.serve.errors import ApiError

# prompt_name, prompt_type -> instruction (raises ApiError for an unknown name)
PromptResolver = Callable[[str, Optional[str]], str]


class InstructionFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    instruction: Optional[str] = None
    prompt_name: Optional[str] = None
    prompt_type: Optional[Literal["query", "document"]] = None


class EmbeddingsRequest(InstructionFields):
    """POST /v1/embeddings (OpenAI's schema, with INSTRUCTOR's instruction fields)."""

    input: Any
    model: Optional[str] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None
    instructions: Optional[list[str]] = None


class EmbedRequest(InstructionFields):
    """POST /embed (text-embeddings-inference's schema; a pair in `inputs` carries its own instruction)."""

    inputs: Union[str, list[Union[str, list[str]]]]
    normalize: bool = True
    truncate: bool = True


def _token_ids(value) -> bool:
    return isinstance(value, int) or (isinstance(value, list) and bool(value) and
                                      all(isinstance(v, int) for v in value))


def openai_texts(value) -> list[str]:
    """`input` as a list of strings, or a 422 that says what is wrong with it."""
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ApiError(422, f"input must be a string or a list of strings, not {type(value).__name__}", "input")
    if not value:
        raise ApiError(422, "input is an empty list: send at least one string", "input")
    if _token_ids(value) or any(_token_ids(v) for v in value):
        raise ApiError(422, "input holds token ids; this server takes text only: INSTRUCTOR tokenizes the "
                            "instruction and the text together (and must know where the instruction ends), so "
                            "send the texts as strings", "input", "token_ids_not_supported")
    for index, item in enumerate(value):
        if not isinstance(item, str):
            raise ApiError(422, f"input[{index}] is a {type(item).__name__}, not a string", "input")
    return value


def _one_instruction(body: InstructionFields, resolve: PromptResolver, others: bool = False) -> Optional[str]:
    given = [name for name in ("instruction", "prompt_name") if getattr(body, name) is not None]
    if others:
        given.append("instructions")
    if len(given) > 1:
        raise ApiError(422, f"give one of {' / '.join(given)}, not several: they would disagree on the "
                            "instruction", given[-1])
    if body.prompt_type is not None and body.prompt_name is None:
        raise ApiError(422, "prompt_type needs prompt_name (a task name of the instruction table)", "prompt_type")
    if body.prompt_name is not None:
        return resolve(body.prompt_name, body.prompt_type)
    return body.instruction


def openai_pairs(body: EmbeddingsRequest, resolve: PromptResolver, default_instruction: str) -> list[list[str]]:
    texts = openai_texts(body.input)
    instruction = _one_instruction(body, resolve, others=body.instructions is not None)
    if body.instructions is not None:
        if len(body.instructions) != len(texts):
            raise ApiError(422, f"instructions has {len(body.instructions)} entries for {len(texts)} inputs: "
                                "give one per input (or one `instruction` for all)", "instructions")
        return [[i, t] for i, t in zip(body.instructions, texts)]
    instruction = default_instruction if instruction is None else instruction
    return [[instruction, t] for t in texts]


def embed_pairs(body: EmbedRequest, resolve: PromptResolver, default_instruction: str) -> list[list[str]]:
    instruction = _one_instruction(body, resolve)
    instruction = default_instruction if instruction is None else instruction
    items = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    if not items:
        raise ApiError(422, "inputs is an empty list: send at least one string", "inputs")
    pairs = []
    for index, item in enumerate(items):
        if isinstance(item, str):
            pairs.append([instruction, item])
        elif len(item) != 2:
            raise ApiError(422, f"inputs[{index}] has {len(item)} elements; a pair is [instruction, text]", "inputs")
        else:
            pairs.append(list(item))
    return pairs


def openai_response(embeddings: np.ndarray, encoding_format: str, model: str, tokens: int) -> bytes:
    """OpenAI's embeddings response; base64 is the little-endian float32 bytes, as OpenAI sends."""
    if encoding_format == "base64":
        vectors = [base64.b64encode(row.astype("<f4").tobytes()).decode("ascii") for row in embeddings]
    else:
        vectors = embeddings.astype(np.float32).tolist()
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    return json.dumps({"object": "list", "data": data, "model": model,
                       "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}).encode()


def embed_response(embeddings: np.ndarray) -> bytes:
    return json.dumps(embeddings.astype(np.float32).tolist()).encode()
