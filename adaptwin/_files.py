"""What the library's atomic writes (a temporary file or folder in the target's folder, then a rename) share:
the mode the published file gets, a durable rename, an atomic swap of two folders, and the temporary names
that say which process writes them, so that a later write can remove what a killed one left.

`tempfile.mkstemp` creates files 0600 and `tempfile.mkdtemp` folders 0700, and safetensors' ``save_file``
writes 0600 too; a rename keeps that mode. Without `give_default_mode`, a saved model, checkpoint or wav
file would be readable by its owner only, where ``open()`` or ``mkdir`` would have left it readable by
the group and others that the umask allows (a model saved into a shared folder and served by another user).
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
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


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:40] or "host"


def temp_prefix(name: str, kind: str = "tmp") -> str:
    """The prefix of a temporary file or folder written on the way to ``name`` in the same folder:
    ``.NAME.KIND-PID@HOST-`` (`tempfile` adds a random tail). `remove_dead_temps` reads the writer back."""
    return f".{name}.{kind}-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # someone else's process, or a platform that cannot tell: assume alive
        return True
    return True


def remove_dead_temps(folder: str | os.PathLike[str], name: str, kinds: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Remove the temporaries (`temp_prefix`) that a writer of ``name`` killed mid-write (``kill -9``, power
    loss) left in ``folder``; returns what was removed.

    Only entries written on this host by a process that no longer exists are touched: a live writer's,
    another machine's on a shared filesystem, and names in any other form stay. An ``old`` folder (the
    previous version of a folder being replaced, moved aside) is put back as ``name`` when ``name`` is missing:
    the writer died between moving the old version aside and renaming the new one in.
    """
    folder = Path(folder)
    pattern = re.compile(rf"\.{re.escape(name)}\.({'|'.join(map(re.escape, kinds))})-(\d+)@([A-Za-z0-9_.-]+)-")
    removed = []
    try:
        entries = list(folder.iterdir())
    except OSError:
        return removed
    for entry in sorted(entries):
        m = pattern.match(entry.name)
        if m is None or m.group(3) != _host() or _alive(int(m.group(2))):
            continue
        target = folder / name
        if m.group(1) == "old" and (entry / "old").is_dir() and not os.path.lexists(target):
            os.rename(entry / "old", target)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the platform or
    filesystem cannot, so the caller falls back to two renames. Either name always holds a whole version."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def replace_dir(tmp: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Publish the finished folder ``tmp`` as ``target`` (same parent), replacing any folder there, then make
    the rename durable. One atomic swap where the platform has one; else the old folder is moved aside under
    `temp_prefix` ``old`` first, so a writer killed between the two renames leaves it for `remove_dead_temps`
    to put back."""
    tmp, target = Path(tmp), Path(target)
    if target.exists():
        if exchange(tmp, target):  # target now holds the new folder, tmp the old one
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            trash = Path(tempfile.mkdtemp(prefix=temp_prefix(target.name, "old"), dir=target.parent))
            os.rename(target, trash / "old")
            os.rename(tmp, target)
            shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, target)
    fsync_dir(target.parent)


def check_writable(target: str | os.PathLike[str]) -> None:
    """Refuse a ``target`` that cannot be created or replaced: the nearest existing folder above it is a file,
    or this process cannot write there (permissions, a read-only filesystem, /proc). Tested by creating and
    removing an empty folder there, which is what the atomic writes need; ``ValueError`` names the folder."""
    target = Path(target)
    above = target.absolute().parent
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise ValueError(f"cannot create {target}: {above} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=temp_prefix(target.name, "probe"), dir=above))
    except OSError as e:
        raise ValueError(f"cannot write {target}: {above} does not take new folders ({e.strerror})") from None
