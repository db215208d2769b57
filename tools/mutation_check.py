"""Do the tests catch real bugs? Applies deliberate bugs one at a time and runs the tests that guard each.

    python tools/mutation_check.py                 # every mutation and its baseline (~10 min on 2 cores)
    python tools/mutation_check.py --only loss     # the mutations whose name contains "loss"
    python tools/mutation_check.py --list

Run it after changing a test, or the code a mutation touches; it is too slow for CI. Each mutation is an
exact text edit of one file in a temporary copy of the working tree (tracked and untracked, not ignored,
files), so the checkout is never touched. A mutation whose text is no longer found is reported as stale:
update it with the code. Each distinct selection of tests runs first unmutated (a failing baseline would make its
mutations look killed), then once per mutation; "killed" means the guarding tests failed.

PYTHONDONTWRITEBYTECODE=1: an edit of the same size restored within a second would otherwise be served
from a stale .pyc, whose freshness check is by size and mtime in seconds.
"""

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    old: str
    new: str
    tests: tuple  # pytest arguments: node ids or files with -k


MUTATIONS = [
    # --- the reference's numbers -------------------------------------------------------------------------
    Mutation("pooling count n = len(instruction) instead of len - 1", "instructor_jax/model/tokenization.py",
             "n = min(len(ids), self.max_seq_length) - 1", "n = min(len(ids), self.max_seq_length)",
             ("tests/test_instructor.py", "-k", "match_sentence_transformers")),
    Mutation("the n <= 1 rule dropped", "instructor_jax/model/tokenization.py",
             'if (self.pooling_rule == "instructor" and n <= 1) or self.pooling_rule == "none":',
             'if self.pooling_rule == "none":',
             ("tests/test_instructor.py", "-k", "single_piece")),
    Mutation("relative position bucket sign flipped", "instructor_jax/model/encoder.py",
             "buckets = (relative > 0).astype(np.int32) * num_buckets",
             "buckets = (relative < 0).astype(np.int32) * num_buckets",
             ("tests/model/test_encoder.py", "-k", "buckets_match or hidden_states")),
    Mutation("RMS-norm statistics in the compute dtype (bf16)", "instructor_jax/model/encoder.py",
             "x32 = x.astype(jnp.float32)\n", "x32 = x\n",
             ("tests/model/test_encoder.py", "-k", "bfloat16 or rms_norm_statistics")),
    Mutation("EncoderConfig default layer_norm_epsilon 1e-6 -> 1e-3", "instructor_jax/model/config.py",
             "layer_norm_epsilon: float = 1e-6", "layer_norm_epsilon: float = 1e-3",
             ("tests/model/test_config.py",)),
    Mutation("EncoderConfig default relative_attention_max_distance 128 -> 64", "instructor_jax/model/config.py",
             "relative_attention_max_distance: int = 128", "relative_attention_max_distance: int = 64",
             ("tests/model/test_config.py",)),
    Mutation("layer_norm_epsilon not read from config.json", "instructor_jax/model/config.py",
             "values = {k: t5[k] for k in fields if k in t5}",
             'values = {k: t5[k] for k in fields if k in t5 and k != "layer_norm_epsilon"}',
             ("tests/model/test_encoder.py", "-k", "hidden_states")),
    Mutation("relative_attention_max_distance not read from config.json", "instructor_jax/model/config.py",
             "values = {k: t5[k] for k in fields if k in t5}",
             'values = {k: t5[k] for k in fields if k in t5 and k != "relative_attention_max_distance"}',
             ("tests/model/test_encoder.py", "-k", "hidden_states")),
    # --- conversion --------------------------------------------------------------------------------------
    Mutation("conversion table: linear weights not transposed", "instructor_jax/checkpoints/tensor_table.py",
             "lambda w: np.ascontiguousarray(w.T).reshape(jax_shape),",
             "lambda w: np.ascontiguousarray(w).reshape(jax_shape),",
             ("tests/test_instructor.py", "-k", "match_sentence_transformers")),
    Mutation("conversion table: relative bias not transposed", "instructor_jax/checkpoints/tensor_table.py",
             "                     lambda w: np.ascontiguousarray(w.T), lambda w: np.ascontiguousarray(w.T),\n",
             "                     lambda w: np.ascontiguousarray(w.reshape(w.shape[::-1])), "
             "lambda w: np.ascontiguousarray(w.T),\n",
             ("tests/test_instructor.py", "-k", "match_sentence_transformers")),
    Mutation("Dense bias dropped", "instructor_jax/checkpoints/tensor_table.py",
             "    if cfg.head.dense_bias:\n", "    if False:\n",
             ("tests/test_instructor.py", "-k", "match_sentence_transformers and nondefault")),
    Mutation("pooling evidence: only the last path component read", "instructor_jax/checkpoints/pooling_evidence.py",
             "        for part in candidate.parts:", "        for part in candidate.parts[-1:]:",
             ("tests/checkpoints/test_pooling_evidence.py", "-k", "wherever_they_live")),
    Mutation("pooling evidence: model card ignored", "instructor_jax/checkpoints/pooling_evidence.py",
             '    card = directory / "README.md"\n', '    card = directory / "README.absent"\n',
             ("tests/checkpoints/test_pooling_evidence.py", "-k", "card")),
    # --- the loss ----------------------------------------------------------------------------------------
    Mutation("loss direction 2 scores positives against positives", "instructor_jax/train/losses.py",
             'p_q = jnp.einsum("id,jd->ij", p, q, precision=_PRECISION)',
             'p_q = jnp.einsum("id,jd->ij", p, p, precision=_PRECISION)',
             ("tests/train/test_losses.py",)),
    Mutation("instructor loss direction 1 targets the wrong logit", "instructor_jax/train/losses.py",
             "loss_1 = _mean_cross_entropy(logits_1, jnp.zeros_like(labels))",
             "loss_1 = _mean_cross_entropy(logits_1, jnp.ones_like(labels))",
             ("tests/train/test_losses.py",)),
    Mutation("temperature ignored", "instructor_jax/train/losses.py",
             "inv_tau = 1.0 / jnp.asarray(temperature, jnp.float32)", "inv_tau = jnp.float32(1.0)",
             ("tests/train/test_losses.py",)),
    # --- training ----------------------------------------------------------------------------------------
    Mutation("init_from weights ignored", "instructor_jax/train/state.py",
             "        return config, params, pathlib.Path(tokenizer_dir)",
             "        return config, None, pathlib.Path(tokenizer_dir)",
             ("tests/train/test_loop.py", "-k", "init_from_a_pytorch")),
    Mutation("task grouping: chunks mix tasks", "instructor_jax/train/data.py",
             "        by_task.setdefault(task, []).append(index)",
             '        by_task.setdefault("all", []).append(index)',
             ("tests/train/test_data.py",)),
    Mutation("iterator restore ignores the pipeline fingerprint", "instructor_jax/train/data.py",
             '        saved = state.pop("pipeline", None)', '        state.pop("pipeline", None); saved = None',
             ("tests/train/test_data.py",)),
    Mutation("GradCache pulls back a zero cotangent", "instructor_jax/train/grad_cache.py",
             "return jax.tree.map(jnp.add, grads, pullback(cotangent)[0]), None",
             "return jax.tree.map(jnp.add, grads, pullback(jnp.zeros_like(cotangent))[0]), None",
             ("tests/train/test_grad_cache.py", "-k", "gradients_equal_the_direct")),
    Mutation("packed attention crosses segments", "instructor_jax/model/encoder.py",
             "allowed = ((segment_ids[:, None, :, None] == segment_ids[:, None, None, :])",
             "allowed = ((segment_ids[:, None, :, None] >= 0)",
             ("tests/model/test_packing.py", "-k", "equals_unpacked")),
    Mutation("packed training gathers every sequence from its row's first segment", "instructor_jax/train/step.py",
             'batch[f"{part}_slots"][..., 1]]', '0 * batch[f"{part}_slots"][..., 1]]',
             ("tests/train/test_packed_training.py", "-k", "equal_unpacked")),
    Mutation("packed training normalizes before the gather (NaN gradient at an empty slot)", "instructor_jax/train/step.py",
             "packing.segments_per_row(ids.shape[1]),\n                       normalize=False,",
             "packing.segments_per_row(ids.shape[1]),\n                       normalize=True,",
             ("tests/train/test_packed_training.py", "-k", "equal_unpacked")),
    Mutation("scan_layers initialises its own parameters", "instructor_jax/model/encoder.py",
             "    if cfg.scan_layers:\n        unrolled =", "    if False:\n        unrolled =",
             ("tests/model/test_encoder.py", "-k", "same_parameters")),
    Mutation("sharding rule heads -> None", "instructor_jax/runtime/sharding.py",
             '    ("heads", "model"),', '    ("heads", None),',
             ("tests/runtime/test_sharding.py::test_training_on_a_mesh_equals_one_device[data=2,fsdp=2,model=2]",)),
    Mutation("sharding rule vocab -> None", "instructor_jax/runtime/sharding.py",
             '    ("vocab", "model"),', '    ("vocab", None),',
             ("tests/runtime/test_sharding.py::test_training_on_a_mesh_equals_one_device[data=2,fsdp=2,model=2]",)),
    Mutation("corpus resume fingerprint ignores changed weights", "instructor_jax/encode/fingerprint.py",
             '    return saved.get("sha256") == current["sha256"]', "    return True",
             ("tests/encode/test_corpus.py", "-k", "resume_refuses")),
    # --- CPU devices --------------------------------------------------------------------------------------
    Mutation("host device count overrides a count already in XLA_FLAGS", "instructor_jax/runtime/host_devices.py",
             "if DEVICE_COUNT_FLAG in flags or _backends_started():", "if _backends_started():",
             ("tests/runtime/test_host_devices.py",)),
    Mutation("the trainer takes every CPU device nobody asked for", "instructor_jax/runtime/host_devices.py",
             "    if not _chosen_here:\n        return None", "    if True:\n        return None",
             ("tests/runtime/test_host_devices.py", "-k", "training")),
    Mutation("encode ignores how many parameter copies fit", "instructor_jax/encode/batch_encoder.py",
             "devices or devices_that_fit(jax.local_devices(), params)", "devices or jax.local_devices()",
             ("tests/encode/test_batch_encoder.py", "-k", "devices_that_fit")),
]


def copy_tree(destination: pathlib.Path) -> None:
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)


def run_tests(copy: pathlib.Path, tests, timeout: int) -> tuple[int, float]:
    # The copy's package comes first on the path (the editable install's finder is consulted after it),
    # in this process's children too.
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(copy)}
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        code = result.returncode
    except subprocess.TimeoutExpired:
        code = -1
    return code, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no_baseline", action="store_true", help="skip the unmutated run of the guarding tests")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per test run")
    args = parser.parse_args(argv)
    mutations = [m for m in MUTATIONS if not args.only or args.only in m.name]
    if args.list:
        for m in mutations:
            print(f"{m.name}  [{m.path}]  {' '.join(m.tests)}")
        return 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutation-check-") as tmp:
        copy = pathlib.Path(tmp)
        copy_tree(copy)
        if not args.no_baseline:
            for tests in dict.fromkeys(m.tests for m in mutations):  # each distinct selection once
                code, seconds = run_tests(copy, tests, args.timeout)
                print(f"baseline  {'pass' if code == 0 else 'FAIL'} unmutated ({seconds:.0f}s: {' '.join(tests)})",
                      flush=True)
                if code != 0:
                    print("these tests fail without any mutation; fix them first")
                    return 2
        survived = stale = 0
        for m in mutations:
            path = copy / m.path
            original = path.read_text()
            if original.count(m.old) != 1:
                print(f"STALE     {m.name}: the text to mutate occurs {original.count(m.old)} times in {m.path}")
                stale += 1
                continue
            path.write_text(original.replace(m.old, m.new))
            try:
                code, seconds = run_tests(copy, m.tests, args.timeout)
            finally:
                path.write_text(original)
            verdict = {0: "SURVIVED", -1: "killed (timeout)"}.get(code, "killed")
            survived += code == 0
            print(f"{verdict:<9} {m.name}  ({seconds:.0f}s: {' '.join(m.tests)})", flush=True)
    print(f"{len(mutations) - survived - stale} of {len(mutations)} killed, {survived} survived, {stale} stale, "
          f"in {(time.perf_counter() - started) / 60:.1f} min")
    return 1 if survived or stale else 0


if __name__ == "__main__":
    sys.exit(main())
