"""Checkpoints on disk, both ways: sentence-transformers / PyTorch directories, instructor-jax's own
directories and t5x checkpoints; safetensors and `.bin` tensors; hub ids resolved to local directories;
and the evidence that decides a checkpoint's pooling rule.

One tensor table (`tensor_table`) names every tensor in every layout, so that reading and writing, in both
directions and both formats, cannot disagree. May import `runtime` and `model` (its configuration); imports
no JAX on the conversion path.
"""
