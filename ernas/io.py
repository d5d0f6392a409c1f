"""Atomic file writes: a reader (or a crash) never sees a half-written checkpoint, table or result.

Every writer goes through the same steps: write a temporary file in the target's directory,
flush and fsync it, then ``os.replace`` it over the target (atomic on POSIX and Windows within one
file system). Parent directories are created as needed.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from ernas.errors import ErnasError

__all__ = ["atomic_open", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "json_default", "read_yaml"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Yield a binary file object; on a clean exit it replaces ``path``, on an error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename itself (best effort; not possible on every platform)."""
    with contextlib.suppress(OSError, AttributeError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    atomic_write_bytes(path, text.encode(encoding))


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` hook for numpy scalars/arrays, paths, sets and tuples-as-keys."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        np = None
    if np is not None:
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable: {obj!r}")


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON (numpy values and paths allowed), with a trailing newline."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=json_default) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (argument order as in torch.save)."""
    import torch  # lazy: this module is also used by torch-free tools

    with atomic_open(path) as f:
        torch.save(obj, f)


def read_yaml(path: str | os.PathLike, what: str) -> Any:
    """Parse a YAML file strictly: a clear ErnasError when it is missing, a folder, not UTF-8,
    not valid YAML, or maps one key twice (PyYAML would silently keep the last)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise ErnasError(f"{path}: the {what} file maps {key!r} twice (lines "
                                 f"{seen[key] + 1} and {key_node.start_mark.line + 1}); keep one "
                                 f"of them (YAML would silently drop the first).")
            seen[key] = key_node.start_mark.line
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    path = Path(path)
    if path.is_dir():
        raise ErnasError(f"{path}: this is a folder, but a {what} file (YAML) was expected; "
                         f"give the path of the .yaml file.")
    if not path.is_file():
        raise ErnasError(f"{path}: the {what} file does not exist; check the path (relative "
                         f"paths are resolved from the current directory).")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ErnasError(f"{path}: the {what} file is not UTF-8 text (byte {e.start}: "
                         f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8.") from None
    try:
        return yaml.load(text, Loader=StrictLoader)
    except yaml.YAMLError as e:
        raise ErnasError(f"{path}: the {what} file is not valid YAML ("
                         f"{' '.join(str(e).split())}); fix the syntax.") from None
