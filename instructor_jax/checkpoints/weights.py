"""Reading and writing named tensors: safetensors (no torch needed) and PyTorch `.bin` (torch needed).

Tensors are read one at a time, so converting a checkpoint holds about one copy of it in memory.
"""

from __future__ import annotations

import errno
import json
import os
import pathlib
from typing import Iterator

import numpy as np

SAFETENSORS = "model.safetensors"
PYTORCH_BIN = "pytorch_model.bin"


class WeightsError(ValueError):
    """A weight file is missing, unreadable, or holds the wrong tensors."""


class TensorReader:
    """Lazy access to the tensors of one checkpoint (a file, or shards listed by an index file)."""

    def __init__(self, files: dict[str, "_SafetensorsFile | _TorchFile"], weight_map: dict[str, str]):
        self._files = files
        self._weight_map = weight_map

    @property
    def names(self) -> list[str]:
        return list(self._weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._files[self._weight_map[name]].shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._files[self._weight_map[name]].get(name)

    def describe(self, name: str) -> str:
        return f"{name} in {self._weight_map[name]}"

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.names:
            yield name, self.get(name)


class _SafetensorsFile:
    def __init__(self, path: pathlib.Path):
        # safetensors' numpy reader asks numpy for np.dtype("bfloat16"), which exists once ml_dtypes has
        # registered it (JAX imports it; `convert` runs without JAX).
        import ml_dtypes  # noqa: F401
        from safetensors import safe_open

        self.path = path
        try:
            self._handle = safe_open(str(path), framework="numpy")
            self.names = list(self._handle.keys())
        except Exception as e:  # SafetensorError, OSError: all mean the same thing to the user
            raise WeightsError(f"could not read {path}: {e}. The file is truncated or corrupt; "
                               "download or export it again") from e

    def shape(self, name):
        return tuple(self._handle.get_slice(name).get_shape())

    def get(self, name):
        try:
            return self._handle.get_tensor(name)
        except Exception as e:
            raise WeightsError(f"could not read tensor {name} from {self.path}: {e}") from e


# torch.load(weights_only=True) has known bypasses before this version (CVE-2025-32434 up to 2.5.1,
# CVE-2026-24747 before 2.10): with an older torch a crafted .bin runs code while loading.
SAFE_TORCH = (2, 10)


def check_torch_loads_safely(version: str, path) -> None:
    """Refuses to unpickle `path` with a torch whose weights_only loading has a known bypass."""
    try:
        numbers = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    except ValueError:
        return  # a development build: its version says nothing we can compare
    if numbers < SAFE_TORCH:
        raise WeightsError(f"refusing to read {path} with torch {version}: before {'.'.join(map(str, SAFE_TORCH))}, "
                           "torch.load(weights_only=True) can be made to run code by a crafted file "
                           "(CVE-2025-32434, CVE-2026-24747). Upgrade torch (pip install 'torch>=2.10'), or use "
                           "a model.safetensors, which needs no torch")


class _TorchFile:
    def __init__(self, path: pathlib.Path):
        try:
            import torch
        except ImportError:
            raise WeightsError(f"reading {path} needs PyTorch: pip install 'instructor-jax[torch]', or "
                               "use a checkpoint saved as model.safetensors, which needs no torch") from None
        self.path = path
        check_torch_loads_safely(torch.__version__, path)
        try:
            try:  # mmap keeps the file's pages out of our own memory; old (non-zip) files cannot do it.
                self._tensors = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                self._tensors = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise WeightsError(f"could not read {path}: {e}. The file is truncated, corrupt, or not a "
                               "PyTorch state dict; download or export it again") from e
        if not isinstance(self._tensors, dict):
            raise WeightsError(f"{path} holds a {type(self._tensors).__name__}, not a state dict of tensors")
        self.names = list(self._tensors)

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def get(self, name):
        import torch

        tensor = self._tensors[name].detach().cpu()
        if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16; reinterpret the bits.
            import ml_dtypes

            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()


def _open_file(path: pathlib.Path):
    return _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchFile(path)


def open_weights(directory, stem: str = "model") -> TensorReader:
    """Opens the weights in `directory`: model.safetensors, pytorch_model.bin, or their sharded indexes.

    `stem` "model" covers both HF names (model.safetensors, pytorch_model.bin).
    """
    directory = pathlib.Path(directory)
    candidates = [f"{stem}.safetensors", f"{stem}.safetensors.index.json",
                  f"pytorch_{stem}.bin", f"pytorch_{stem}.bin.index.json"]
    for candidate in candidates:
        path = directory / candidate
        if not path.exists():
            continue
        if candidate.endswith(".index.json"):
            try:
                shard_of = json.loads(path.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise WeightsError(f"{path} is not a valid shard index ({e})") from e
            files = {shard: _open_file(directory / shard) for shard in sorted(set(shard_of.values()))}
            return TensorReader(files, dict(shard_of))
        reader = _open_file(path)
        return TensorReader({path.name: reader}, {name: path.name for name in reader.names})
    raise WeightsError(f"no weights in {directory}: expected one of {', '.join(candidates)}")


def save_safetensors(path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> None:
    """Writes numpy arrays (bfloat16 from ml_dtypes included) without copying them first."""
    from safetensors.numpy import save_file

    from instructor_jax.runtime.fileio import current_umask

    try:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path),
                  metadata=metadata or {"format": "pt"})
    except Exception as e:  # SafetensorError wraps the OS error (a full disk, say) in text only
        message = str(e)
        if "os error 28" in message or "No space left" in message:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {path}; free some space or "
                                        "write elsewhere") from None
        raise OSError(f"could not write {path}: {message}") from e
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates it 0600; others may need to read it
