"""What the library's atomic writes (a temporary file or folder in the target's folder, then a rename) share:
the mode the published file gets, and a durable rename.

`tempfile.mkstemp` creates files 0600 and `tempfile.mkdtemp` folders 0700, and safetensors' ``save_file``
writes 0600 too; a rename keeps that mode. Without `give_default_mode`, a saved model, checkpoint or wav
file would be readable by its owner only, where ``open()`` or ``mkdir`` would have left it readable by
the group and others that the umask allows (a model saved into a shared folder and served by another user).
"""

from __future__ import annotations

import os
from pathlib import Path


def umask() -> int:
    """The process's umask. Read from ``/proc/self/status`` where Linux reports it (4.7 and later), so
    other threads never see it changed; elsewhere set and restored at once (what the stdlib offers)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_default_mode(path: str | os.PathLike[str], *, directory: bool = False) -> None:
    """Set ``path``'s mode to what ``open()`` (0666) or ``mkdir`` (0777) would have created, less the umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~umask())


def give_default_modes(folder: str | os.PathLike[str]) -> None:
    """`give_default_mode` to ``folder`` and everything under it (a folder built under a temporary name,
    before its rename: what ``save_pretrained`` writes there includes 0600 safetensors files)."""
    mask = umask()
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def fsync_dir(folder: str | os.PathLike[str]) -> None:
    """Make a rename into ``folder`` durable (its directory entry), where the platform can open a folder."""
    try:
        fd = os.open(Path(folder), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
