"""The embedded default job: train the tiny model on the bundled MEDI sample, encode with it, export it.

1. `train` with TrainConfig's defaults (configs/tiny.gin): held-out in-batch retrieval accuracy before and after.
2. `Instructor.from_pretrained(W/model)`: retrieval over the whole held-out set with `encode`, where the
   right document depends on the instruction.
3. The exported sentence-transformers directory loads in plain `SentenceTransformer(dir)` and reproduces
   the JAX embeddings; converting it back to JAX and to PyTorch again is bit-identical.
4. Pictures (`instructor-jax plot`): training curves, and held-out texts embedded with and without their
   instruction.

Everything goes to one folder (default `runs/demo`), kept, so that its model can be used next; a rerun
replaces that folder only if an earlier demo wrote it.
"""

from __future__ import annotations

import pathlib
import shlex
import shutil

import numpy as np

TOLERANCE = 1e-5
TARGET_ACCURACY = 0.9
DEFAULT_WORKDIR = "runs/demo"
MARKER = ".instructor-jax-demo"  # says a folder is a demo's own, which a rerun may replace


def prepare_workdir(workdir) -> pathlib.Path:
    """An empty demo folder: created, or an earlier demo's replaced; anything else there is refused."""
    root = pathlib.Path(workdir)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).exists():
            raise FileExistsError(f"{root} exists and was not written by instructor-jax demo; give the demo "
                                  "another --workdir, or move that folder away")
        if (root / "run" / "checkpoints").exists() and not (root / "run" / "model").exists():
            return root  # an interrupted demo: its training resumes
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text("written by instructor-jax demo; a rerun of the demo replaces this folder\n")
    return root


def next_steps(model_dir: pathlib.Path, root: pathlib.Path) -> str:
    model, quoted_root = shlex.quote(str(model_dir)), shlex.quote(str(root))
    return f"""
The trained model is in {model_dir} (kept). It is a toy: a 356-piece vocabulary, 64 wide, 2 layers, 64 tokens,
trained on the bundled sample for a minute, so texts unlike the sample's get meaningless embeddings. Next:
  instructor-jax encode --model {model} --input texts.txt --instruction "Represent the sentence for retrieval: " --output emb.npy
  instructor-jax eval   --model {model} --output {quoted_root}/eval
  instructor-jax plot   --metrics {quoted_root}/run/metrics.jsonl --model {model} --output {quoted_root}/pictures
  instructor-jax serve  --model {model}
(the commands live in .venv/bin after make demo). For a real model offline:
  hf download hkunlp/instructor-large --local-dir instructor-large, then --model instructor-large"""


def held_out_retrieval(model, examples) -> dict:
    """Accuracy@1 per task: each query against every positive of its task in the held-out set."""
    scores = {}
    for task in dict.fromkeys(e.task for e in examples):
        group = [e for e in examples if e.task == task]
        queries = model.encode([list(e.query) for e in group])
        documents = model.encode([list(e.pos) for e in group])
        scores[task] = float(np.mean(np.argmax(queries @ documents.T, axis=1) == np.arange(len(group))))
    return scores


def show_pictures(run_dir: pathlib.Path, model, pictures=None) -> None:
    """4. Training curves and a map of held-out texts with and without their instruction, as PNG files
    (kept when the rest of a temporary demo directory goes)."""
    from instructor_jax import plots
    from instructor_jax.evaluation.instructions import BUNDLED_TASKS

    pictures = pathlib.Path(pictures or run_dir / "pictures")
    curves = plots.training_curves(run_dir / "metrics.jsonl", pictures / "training_curves.png")
    texts, labels, instruction, names = plots.labelled_set(BUNDLED_TASKS / "TinySubjectClustering")
    embedding_map = plots.embedding_map(model, texts, labels, instruction, pictures / "embedding_map.png",
                                        label_names=names)
    print(f"4. pictures: {curves} (loss, learning rate, held-out accuracy by step) and {embedding_map} "
          "(sentences by subject, embedded without and with the instruction)")


def run_demo(workdir=None) -> bool:
    from instructor_jax.runtime import extras

    # Checked before the minute of training: the parity check needs torch, the pictures matplotlib.
    extras.require("torch", "instructor-jax demo")
    extras.require("plot", "instructor-jax demo")
    from sentence_transformers import SentenceTransformer

    from instructor_jax import Instructor
    from instructor_jax.train import medi
    from instructor_jax.checkpoints.convert import convert
    from instructor_jax.reference import reference_embeddings
    from instructor_jax.train.config import TrainConfig
    from instructor_jax.train.loop import train
    from instructor_jax.checkpoints.weights import open_weights

    cfg = TrainConfig()
    root = prepare_workdir(workdir or DEFAULT_WORKDIR)
    print(f"1. instructor-jax train (configs/tiny.gin defaults) --workdir {root / 'run'}", flush=True)
    result = train(root / "run", cfg)
    if "held_out_accuracy" not in result:
        return False  # preempted: rerun to resume
    model = Instructor.from_pretrained(root / "run" / "model")
    held_out = medi.read_medi(cfg.held_out_file)
    print(f"2. encode with the trained model: each held-out query against all positives of its task "
          f"({len(held_out)} triples)")
    for task, accuracy in held_out_retrieval(model, held_out).items():
        print(f"   {task:<14} accuracy@1 {accuracy:.3f}")
    pairs = [list(e.query) for e in held_out[::25]] + [list(e.pos) for e in held_out[::25]]
    ours = model.encode(pairs)
    exported = SentenceTransformer(str(root / "run" / "sentence_transformers"), device="cpu")
    parity = float(np.abs(reference_embeddings(exported, pairs) - ours).max())
    print(f"3. SentenceTransformer({root / 'run' / 'sentence_transformers'}) vs JAX, {len(pairs)} embeddings: "
          f"max |diff| = {parity:.2e}")
    convert(root / "run" / "sentence_transformers", root / "jax_again", overwrite=True)
    convert(root / "jax_again", root / "pytorch_again", overwrite=True)
    before, after = open_weights(root / "run" / "sentence_transformers"), open_weights(root / "pytorch_again")
    identical = sorted(before.names) == sorted(after.names) and all(
        np.array_equal(before.get(n), after.get(n)) for n in before.names)
    print(f"   PyTorch -> JAX -> PyTorch: {len(before.names)} tensors, bit-identical: {identical}")
    show_pictures(root / "run", model, root / "pictures")
    learned = result["held_out_accuracy"] >= TARGET_ACCURACY
    print(f"held-out in-batch accuracy {result['held_out_accuracy_before']:.3f} -> {result['held_out_accuracy']:.3f} "
          f"(chance {1 / cfg.batch_size:.3f}; target >= {TARGET_ACCURACY})")
    ok = learned and identical and parity < TOLERANCE
    print(next_steps(root / "run" / "model", root))
    print("demo: OK" if ok else "demo: FAILED")
    return ok
