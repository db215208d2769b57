"""The model itself: its configuration (and the mapping to transformers' T5Config), the T5 encoder and the
INSTRUCTOR head in Flax, its attention implementations (xla, cuDNN, Pallas TPU), tokenization of (instruction, text) pairs, packing several inputs into one row,
and the FLOP counts that the layout planner and MFU use.

Knows nothing of files, training or checkpoints. May import `runtime` only. `config` and `tokenization`
import no JAX, so that checkpoint conversion runs without it.
"""
