"""instructor-jax: instruction-following text embedders (INSTRUCTOR, GTR) in JAX."""

from instructor_jax import host_devices
from instructor_jax.config import EncoderConfig, HeadConfig, InstructorConfig

# Before JAX starts: on a CPU-only machine, several JAX CPU devices (twice the cores, up to 8), as XLA:CPU runs
# attention's batched products on one thread per device. INSTRUCTOR_JAX_CPU_DEVICES=1 keeps JAX's single CPU device.
host_devices.configure()

__all__ = ["Instructor", "InstructorConfig", "EncoderConfig", "HeadConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: `instructor-jax convert` and the config classes need no JAX.
    if name == "Instructor":
        from instructor_jax.instructor import Instructor

        return Instructor
    raise AttributeError(f"module 'instructor_jax' has no attribute {name!r}")
