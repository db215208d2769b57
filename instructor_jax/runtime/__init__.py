"""Where and how programs run: device meshes and logical-axis sharding rules, multi-process start-up, the
CPU device count, Ctrl-C and SIGTERM handling, lock files, and file I/O that never leaves a half-written
output under its final name (local paths and gs:// URLs).

The bottom layer: imports nothing else from instructor_jax. Everything above may use it.
"""
