"""Small shared helpers: atomic file writes (a crash leaves the old file or the new one, never half of one)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
from pathlib import Path
from typing import Iterator

# ".NAME.RANDOM.tmp": the temporary files of `atomic_path` (RANDOM: 12 hex digits; 8 characters of
# [a-z0-9_] in files written before it created them itself with tempfile.mkstemp)
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8,}\.tmp")


def _new_temp(path: Path) -> tuple[str, int]:
    """Create an empty, uniquely named file next to `path`; return its name and mode. It is created with mode
    0o666 so that the kernel applies the umask (and any default ACL), as for any new file: a file written
    through `atomic_path` gets the permissions a plain `open(path, "w")` would give it."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        try:
            return str(tmp), stat.S_IMODE(os.fstat(fd).st_mode)
        finally:
            os.close(fd)
    raise FileExistsError(f"cannot create a temporary file next to {path}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to `path`; once the block succeeds, fsync it and rename it over `path`.
    For writers that want a filename (np.save, faiss.write_index, safetensors). The file gets the mode a new
    file gets under the process's umask (0o644 under umask 022), also when the writer replaced the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, mode = _new_temp(path)
    try:
        yield tmp
        os.chmod(tmp, mode)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def new_file_mode(directory: str | os.PathLike) -> int:
    """The mode a new file in `directory` gets under this process's umask (and default ACL), for writers that
    create their temporary files with `tempfile.mkstemp` (always 0o600) and must `chmod` them before the rename."""
    tmp, mode = _new_temp(Path(directory) / "mode-probe")
    os.unlink(tmp)
    return mode


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files (".NAME.RANDOM.tmp") that writers killed inside `atomic_path` left in
    `directory` (not in its subdirectories); returns the deleted paths. Only call it while no other writer can
    be writing into `directory` (e.g. under the directory's write lock): a live writer's temp file looks the same."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    with os.scandir(directory) as entries:
        for e in entries:
            if _TEMP_NAME.fullmatch(e.name) and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(e.path)
                    removed.append(Path(e.path))
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
