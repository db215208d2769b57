"""Reference checkpoints made with the real PyTorch stack (transformers + sentence-transformers).

No hub is reachable where this project is tested, so tests, the demo and the benchmarks build random-init
T5 encoders of any shape with transformers, wrap them in the INSTRUCTOR pipeline with sentence-transformers
(Transformer, Pooling(include_prompt=False), Dense without bias, Normalize) and save them in the exact
layout the hkunlp checkpoints have. Needs the `torch` extra.
"""

from __future__ import annotations

import pathlib

import numpy as np

from instructor_jax.config import InstructorConfig, t5_config_from_encoder

TINY_TOKENIZER = pathlib.Path(__file__).parent / "assets" / "tiny_tokenizer"


def make_reference_checkpoint(directory, config: InstructorConfig, seed: int = 0,
                              tokenizer_dir=TINY_TOKENIZER, safetensors: bool = True):
    """Saves a random-init sentence-transformers INSTRUCTOR model to `directory`; returns the model."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    directory = pathlib.Path(directory)
    torch.manual_seed(seed)
    t5_config = T5Config(**{k: v for k, v in t5_config_from_encoder(config.encoder).items()
                            if k not in ("architectures", "model_type", "dtype")})
    encoder = T5EncoderModel(t5_config).eval()
    with tempfile.TemporaryDirectory() as tmp:
        encoder.save_pretrained(tmp, safe_serialization=safetensors)
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(tmp)
        modules = [models.Transformer(tmp, max_seq_length=config.max_seq_length,
                                      do_lower_case=config.do_lower_case)]
        modules.append(models.Pooling(config.encoder.d_model, pooling_mode="mean",
                                      include_prompt=config.pooling_rule == "none"))
        if config.head.dense_features is not None:
            modules.append(models.Dense(config.encoder.d_model, config.head.dense_features,
                                        bias=config.head.dense_bias, activation_function=torch.nn.Identity()))
        if config.head.normalize:
            modules.append(models.Normalize())
        model = SentenceTransformer(modules=modules, device="cpu")
        model.save(str(directory))
    if not safetensors:
        # transformers 5 writes only safetensors; the hkunlp repositories hold torch.save'd state dicts.
        from safetensors.torch import load_file

        for weights in [directory / "model.safetensors", *directory.glob("*/model.safetensors")]:
            torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
            weights.unlink()
    return model


def reference_embeddings(model, pairs) -> np.ndarray:
    """What sentence-transformers gives for [instruction, text] pairs: one `encode(texts, prompt=instruction)`
    per distinct instruction (texts stripped, as InstructorEmbedding 1.0.1 does), in input order."""
    out = [None] * len(pairs)
    for instruction in {i for i, _ in pairs}:
        rows = [k for k, (i, _) in enumerate(pairs) if i == instruction]
        embedded = model.encode([pairs[k][1].strip() for k in rows], prompt=instruction or None,
                                convert_to_numpy=True, show_progress_bar=False)
        for k, row in zip(rows, embedded):
            out[k] = row
    return np.stack(out)
