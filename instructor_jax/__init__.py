"""instructor-jax: instruction-following text embedders (INSTRUCTOR, GTR) in JAX.

The public surface: `Instructor` (load, encode, save, export), the configuration classes, and
`open_embeddings` (what `instructor-jax encode` wrote, as one memory-mapped view). The subpackages, lowest
first: `runtime` (meshes, processes, files), `model`, `checkpoints`, `encode`, then `evaluation` and
`train`; the modules here (`instructor`, `cli`, `demo`, `plots`, `reference`) sit on top. See
docs/architecture.md.
"""

from instructor_jax.model.config import EncoderConfig, HeadConfig, InstructorConfig
from instructor_jax.runtime import extras, host_devices

# Before JAX starts: on a CPU-only machine, several JAX CPU devices (twice the cores, up to 8), as XLA:CPU runs
# attention's batched products on one thread per device. INSTRUCTOR_JAX_CPU_DEVICES=1 keeps JAX's single CPU device.
host_devices.configure()
extras.quiet_torch_advice()

__all__ = ["Instructor", "InstructorConfig", "EncoderConfig", "HeadConfig", "open_embeddings"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: `instructor-jax convert` and the config classes need no JAX.
    if name == "Instructor":
        from instructor_jax.instructor import Instructor

        return Instructor
    if name == "open_embeddings":
        from instructor_jax.encode.embedding_store import open_embeddings

        return open_embeddings
    raise AttributeError(f"module 'instructor_jax' has no attribute {name!r}")
