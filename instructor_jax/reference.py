"""Reference checkpoints made with the real PyTorch stack (transformers + sentence-transformers).

No hub is reachable where this project is tested, so tests, the demo and the benchmarks build random-init
T5 encoders of any shape with transformers, wrap them in the INSTRUCTOR pipeline with sentence-transformers
(Transformer, Pooling(include_prompt=False), Dense without bias, Normalize) and save them in the exact
layout the hkunlp checkpoints have. Needs the `torch` extra.
"""

from __future__ import annotations

import pathlib

import numpy as np

from instructor_jax.model.config import InstructorConfig, t5_config_from_encoder

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


def instructor_embedding_reference(model, pairs) -> np.ndarray:
    """The InstructorEmbedding 1.0.1 rule, computed with sentence-transformers: the first
    `n = len(tokenize(instruction)) - 1` tokens are left out of the pooling (`prompt=`), except that
    `n <= 1` pools everything (no prompt). `model`'s Pooling must have `include_prompt=False`."""
    if model[1].include_prompt:
        raise ValueError("the reference model's Pooling must have include_prompt=False")
    out = [None] * len(pairs)
    for instruction in {i for i, _ in pairs}:
        rows = [k for k, (i, _) in enumerate(pairs) if i == instruction]
        one_piece = len(model.tokenizer(instruction)["input_ids"]) - 1 <= 1
        if one_piece:  # 1.0.1 pools the instruction's piece too: the whole joined string, no prompt
            texts, prompt = [(instruction + pairs[k][1].strip()).strip() for k in rows], None
        else:
            texts, prompt = [pairs[k][1].strip() for k in rows], instruction
        embedded = model.encode(texts, prompt=prompt, convert_to_numpy=True, show_progress_bar=False)
        for k, row in zip(rows, embedded):
            out[k] = row
    return np.stack(out)


def rewrite_as_hkunlp_layout(directory, max_seq_length: int = 512) -> None:
    """Rewrites a saved sentence-transformers INSTRUCTOR directory into the files the hkunlp repositories
    have (sentence-transformers 2.2 metadata): standard module types, a pooling config without
    `include_prompt` (it predates the key), no prompts, an empty 3_Normalize, no model card. The weights
    stay as they are."""
    import json

    directory = pathlib.Path(directory)

    def write(name, data):
        (directory / name).write_text(json.dumps(data, indent=2))

    d_model = json.loads((directory / "config.json").read_text())["d_model"]
    modules = [("", "Transformer"), ("1_Pooling", "Pooling")]
    write("1_Pooling/config.json", {"word_embedding_dimension": d_model, "pooling_mode_cls_token": False,
                                    "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
                                    "pooling_mode_mean_sqrt_len_tokens": False})
    if (directory / "2_Dense").exists():
        dense = json.loads((directory / "2_Dense/config.json").read_text())
        write("2_Dense/config.json", {k: dense[k] for k in ("in_features", "out_features", "bias",
                                                             "activation_function")})
        modules.append(("2_Dense", "Dense"))
    if (directory / "3_Normalize").exists():
        for leftover in (directory / "3_Normalize").iterdir():
            leftover.unlink()
        modules.append(("3_Normalize", "Normalize"))
    write("modules.json", [{"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
                           for i, (path, kind) in enumerate(modules)])
    write("sentence_bert_config.json", {"max_seq_length": max_seq_length, "do_lower_case": False})
    write("config_sentence_transformers.json",
          {"__version__": {"sentence_transformers": "2.2.2", "transformers": "4.20.0", "pytorch": "1.7.0"}})
    if (directory / "README.md").exists():
        (directory / "README.md").unlink()  # sentence-transformers' generated card names no model


def lay_out_as_hub_cache(source, cache_dir, hub_id: str, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """Copies a model directory into a Hugging Face hub cache as `snapshot_download` leaves it:
    `models--ORG--NAME/blobs/<sha256>` holds the contents and `snapshots/<commit>/<path>` are relative
    symlinks into `../../blobs/`; `refs/main` names the commit. Returns the snapshot directory."""
    import hashlib
    import os
    import shutil

    source = pathlib.Path(source)
    repo = pathlib.Path(cache_dir) / ("models--" + hub_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for directory in (p for p in source.rglob("*") if p.is_dir()):  # empty module folders (3_Normalize)
        (snapshot / directory.relative_to(source)).mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def torch_train_step(directory, config: InstructorConfig, train_config, device: str = "cpu",
                     dtype: str = "float32"):
    """The trainer's update written in PyTorch, on a checkpoint saved by `make_reference_checkpoint`:
    transformers' T5EncoderModel, the INSTRUCTOR head (mean over text tokens, Dense, L2 norm), the
    contrastive loss of either mode, global-norm clipping and AdamW with the trainer's decay mask (matrices
    and embeddings decay; norm scales and biases do not), at the schedule's first-step learning rate.

    Returns `step(batch, keep_grads=False)`: one update on a numpy batch as the trainer's BatchTokenizer
    makes it; the loss, or (loss, {torch name: gradient before clipping}). `model` and `dense` are exposed
    on the function for reading the parameters back. The benchmark and the trainer's parity test share it.
    """
    import torch
    import torch.nn.functional as F
    from transformers import T5EncoderModel

    from instructor_jax.checkpoints.weights import open_weights

    directory = pathlib.Path(directory)
    encoder = T5EncoderModel.from_pretrained(str(directory)).to(device).train()
    dense = None
    if config.head.dense_features is not None:
        dense = torch.nn.Linear(config.encoder.d_model, config.head.dense_features,
                                bias=config.head.dense_bias).to(device)
        weights = open_weights(directory / "2_Dense")
        dense.load_state_dict({name.split(".", 1)[1]: torch.from_numpy(weights.get(name).copy())
                               for name in weights.names})
    named = [(n, p) for n, p in encoder.named_parameters()]
    if dense is not None:
        named += [(f"linear.{n}", p) for n, p in dense.named_parameters()]
    no_decay = [p for n, p in named if n.endswith(("layer_norm.weight", "bias"))]
    decay = [p for n, p in named if not n.endswith(("layer_norm.weight", "bias"))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": train_config.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=train_config.learning_rate, betas=(train_config.adam_b1, train_config.adam_b2),
                                  eps=train_config.adam_eps)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")

    def embed(ids, mask, n):
        hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        positions = torch.arange(ids.shape[1], device=device)[None]
        pool = (mask.bool() & (positions >= n[:, None])).float()
        pooled = (hidden * pool[..., None]).sum(1) / pool.sum(1, keepdim=True).clamp(min=1e-9)
        pooled = dense(pooled) if dense is not None else pooled
        return F.normalize(pooled, dim=-1) if config.head.normalize else pooled

    def step(batch, keep_grads: bool = False):
        t = {k: torch.as_tensor(v, device=device, dtype=torch.long) for k, v in batch.items()}
        b, k, length = t["neg_ids"].shape
        with autocast:
            q = embed(t["query_ids"], t["query_mask"], t["query_instruction_lengths"])
            p = embed(t["pos_ids"], t["pos_mask"], t["pos_instruction_lengths"])
            n = embed(t["neg_ids"].reshape(b * k, length), t["neg_mask"].reshape(b * k, length),
                      t["neg_instruction_lengths"].reshape(-1))
        q, p, n = q.float(), p.float(), n.float()
        labels = torch.arange(b, device=device)
        if train_config.loss_mode == "instructor":
            # Query i vs [its positive, every hard negative]; target 0.
            logits_1 = torch.cat([(q * p).sum(-1, keepdim=True), q @ n.T], dim=1) / train_config.temperature
            loss_1 = F.cross_entropy(logits_1, torch.zeros_like(labels))
        else:  # in_batch: query i vs every positive and every hard negative; target i
            loss_1 = F.cross_entropy(torch.cat([q @ p.T, q @ n.T], dim=1) / train_config.temperature, labels)
        loss = loss_1 + F.cross_entropy((p @ q.T) / train_config.temperature, labels)  # positive i vs all queries
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().cpu().numpy().copy() for n, p in named} if keep_grads else None
        if train_config.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(encoder.parameters() if dense is None
                                           else [*encoder.parameters(), *dense.parameters()],
                                           train_config.grad_clip_norm)
        optimizer.step()
        return (loss.item(), grads) if keep_grads else loss.item()  # .item() waits for the device

    step.model, step.dense = encoder, dense
    return step
