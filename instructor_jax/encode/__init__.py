"""Encoding at scale: the jit-compiled, bucketed, packed and sharded batch encoder; streaming a corpus file
into a resumable .npy; one corpus split over the processes of a multi-host job; the embedding store (shards,
manifest, one memory-mapped view, merging); and the weights fingerprint that guards a resume.

May import `runtime`, `model` and `checkpoints`.
"""
