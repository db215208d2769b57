"""instructor_jax.runtime.host_devices: several CPU devices on a CPU-only machine, and only where it cannot surprise."""

import os
import subprocess
import sys

import jax
import pytest

from instructor_jax.runtime import host_devices


@pytest.mark.parametrize("cores, expected", [(1, 2), (2, 4), (3, 4), (4, 8), (6, 8), (64, 8)])
def test_twice_the_cores_as_a_power_of_two_at_most_eight(cores, expected):
    assert host_devices.cpu_device_count({}, cores=cores) == expected


def test_the_environment_variable_chooses_the_count():
    assert host_devices.cpu_device_count({host_devices.ENV_CPU_DEVICES: "3"}, cores=16) == 3
    for bad in ("0", "-2", "many"):
        with pytest.raises(ValueError, match="INSTRUCTOR_JAX_CPU_DEVICES must be a positive integer"):
            host_devices.cpu_device_count({host_devices.ENV_CPU_DEVICES: bad})


def test_configure_keeps_a_count_already_in_xla_flags_and_leaves_a_started_jax_alone():
    flags = "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=3"
    environ = {"XLA_FLAGS": flags}
    assert host_devices.configure(environ) is None and environ["XLA_FLAGS"] == flags
    jax.devices()  # this process's backends have started: the flag would be ignored, so nothing is set
    environ = {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
    assert host_devices.configure(environ) is None and environ == {"XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}


def _devices_after_import(env_changes: dict, code: str = "import instructor_jax, jax; print(len(jax.devices('cpu')))") -> int:
    """What `code` prints last, run in a fresh process without the suite's XLA_FLAGS."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", host_devices.ENV_CPU_DEVICES)}
    env.update(env_changes)
    result = subprocess.run([sys.executable, "-c", code],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_importing_instructor_jax_gives_the_cpu_devices_unless_told_otherwise():
    assert _devices_after_import({}) == host_devices.cpu_device_count({})
    assert _devices_after_import({host_devices.ENV_CPU_DEVICES: "1"}) == 1
    assert _devices_after_import({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}) == 3
    # JAX already started before instructor_jax was imported: its device count stays as it was.
    assert _devices_after_import({}, "import jax; jax.devices(); import instructor_jax; print(len(jax.devices()))") == 1
    # A bad setting is reported and changes nothing; the import still works.
    assert _devices_after_import({host_devices.ENV_CPU_DEVICES: "lots"}) == 1


def test_training_keeps_one_cpu_device_where_the_count_was_not_asked_for():
    code = ("import instructor_jax, jax; from instructor_jax.runtime import host_devices; "
            "print(len(host_devices.training_devices() or jax.devices()))")
    assert _devices_after_import({}, code) == 1
    # Asked for, in either way: the trainer's default mesh takes them all.
    assert _devices_after_import({host_devices.ENV_CPU_DEVICES: "2"}, code) == 2
    assert _devices_after_import({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"}, code) == 3
    # In this process the suite's XLA_FLAGS chose the 8 devices: training uses them all.
    assert host_devices.training_devices() is None
