"""Small shared helpers: atomic writes, device choice, seeding."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

import torch

__all__ = ["atomic_write_text", "atomic_torch_save", "resolve_device", "derive_seed"]


def _atomic_replace(path: Path, write) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666 lets the user's umask decide the permissions, as for any other file they write.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write text so that readers see either the old file or the whole new one."""
    return _atomic_replace(Path(path), lambda fh: fh.write(text.encode("utf-8")))


def atomic_torch_save(obj: object, path: str | Path) -> Path:
    """``torch.save`` through a temporary file in the same folder and an atomic rename."""
    return _atomic_replace(Path(path), lambda fh: torch.save(obj, fh))


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch.device."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)"
        )
    return device


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (run seed, epoch, step, sample ...), stable across platforms."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)
