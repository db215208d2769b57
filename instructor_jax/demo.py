"""The embedded default job: a tiny INSTRUCTOR model made with PyTorch, converted to JAX and back.

Shows that the JAX encoder reproduces sentence-transformers' embeddings, that PyTorch -> JAX -> PyTorch is
bit-identical, and that the exported directory loads in plain `SentenceTransformer(dir)`.
"""

from __future__ import annotations

import pathlib
import tempfile

import numpy as np

from instructor_jax.config import tiny_config

QUERY = "Represent the Wikipedia question for retrieving supporting documents: "
DOCUMENT = "Represent the Wikipedia document for retrieval: "
TEXTS = [
    (QUERY, "where is the food stored in a yam plant"),
    (DOCUMENT, "Capitalism has been dominant in the Western world since the end of feudalism."),
    (DOCUMENT, "The yam plant stores food in its roots, which grow into large tubers."),
    (DOCUMENT, "Zürich and São Paulo are cities; 東京 is Tokyo."),
]
TOLERANCE = 1e-5


def run_demo(workdir=None) -> bool:
    from sentence_transformers import SentenceTransformer

    from instructor_jax import Instructor
    from instructor_jax.convert import convert
    from instructor_jax.reference import make_reference_checkpoint, reference_embeddings
    from instructor_jax.weights import open_weights

    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(workdir or tmp)
        pytorch_dir, jax_dir, back_dir = root / "pytorch", root / "jax", root / "pytorch_again"
        config = tiny_config(pooling_rule="sentence-transformers")
        print(f"1. a random-init INSTRUCTOR-shaped model, made with transformers + sentence-transformers: {pytorch_dir}")
        reference = make_reference_checkpoint(pytorch_dir, config)
        print(f"2. instructor-jax convert {pytorch_dir.name} {jax_dir.name}")
        convert(pytorch_dir, jax_dir, overwrite=True)
        model = Instructor.from_pretrained(jax_dir)
        pairs = [list(p) for p in TEXTS]
        ours = model.encode(pairs)
        parity = float(np.abs(ours - reference_embeddings(reference, pairs)).max())
        print(f"   JAX vs sentence-transformers, {len(pairs)} embeddings of dim {model.dim}: max |diff| = {parity:.2e}")
        print(f"   cosine(query, documents) = {np.round(ours[1:] @ ours[0], 4).tolist()} (random weights)")
        print(f"3. instructor-jax convert {jax_dir.name} {back_dir.name}")
        convert(jax_dir, back_dir, overwrite=True)
        before, after = open_weights(pytorch_dir), open_weights(back_dir)
        identical = sorted(before.names) == sorted(after.names) and all(
            np.array_equal(before.get(n), after.get(n)) for n in before.names)
        print(f"   PyTorch -> JAX -> PyTorch: {len(before.names)} tensors, bit-identical: {identical}")
        exported = SentenceTransformer(str(back_dir), device="cpu")
        export_parity = float(np.abs(reference_embeddings(exported, pairs) - ours).max())
        print(f"   SentenceTransformer({back_dir.name}) vs JAX: max |diff| = {export_parity:.2e}")
    ok = identical and parity < TOLERANCE and export_parity < TOLERANCE
    print("demo: OK" if ok else "demo: FAILED")
    return ok
