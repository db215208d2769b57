"""instructor-jax: instruction-following text embedders (INSTRUCTOR, GTR) in JAX."""

from instructor_jax.config import EncoderConfig, HeadConfig, InstructorConfig

__all__ = ["Instructor", "InstructorConfig", "EncoderConfig", "HeadConfig"]
__version__ = "0.1.0"


def __getattr__(name):
    # Imported on first use: `instructor-jax convert` and the config classes need no JAX.
    if name == "Instructor":
        from instructor_jax.instructor import Instructor

        return Instructor
    raise AttributeError(f"module 'instructor_jax' has no attribute {name!r}")
