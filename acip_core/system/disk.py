"""Disk bounds: the least recently used entries of a cache folder go first; leftovers of killed
writes are removed at start."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path


# -- disk ---------------------------------------------------------------------------------------
def _bytes(path: Path) -> int:
    try:
        if path.is_symlink() or path.is_file():
            return path.lstat().st_size
        return sum(p.lstat().st_size for p in path.rglob("*") if not p.is_dir())
    except OSError:
        return 0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def evict_oldest(folder, max_bytes: float, keep=(), entries=None) -> list[Path]:
    """Removes the least recently modified entries (files or folders) of `folder` until the rest hold
    at most max_bytes; never those in `keep`. `entries` restricts which entries count and may go.
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir() or math.isinf(max_bytes):
        return []
    keep = {Path(k).resolve() for k in keep}
    items = list(entries) if entries is not None else list(folder.iterdir())
    sized = []
    for p in items:
        try:
            sized.append((p.lstat().st_mtime, p, _bytes(p)))
        except OSError:
            continue
    total = sum(s for _, _, s in sized)
    removed = []
    for _, p, s in sorted(sized, key=lambda x: x[0]):
        if total <= max_bytes:
            break
        if p.resolve() in keep:
            continue
        _remove(p)
        total -= s
        removed.append(p)
    return removed


def remove_leftovers(folder, older_than_s: float = 600, depth: int = 2) -> list[Path]:
    """Removes `*.tmp` files and folders (what a killed atomic write leaves) under `folder`, down to
    `depth` levels, when older than `older_than_s` (a younger one may belong to a live process)."""
    folder, now, removed = Path(folder), time.time(), []
    if not folder.is_dir():
        return removed

    def walk(d: Path, level: int):
        try:
            children = list(d.iterdir())
        except OSError:
            return
        for p in children:
            try:
                old = now - p.lstat().st_mtime > older_than_s
            except OSError:
                continue
            if p.name.endswith(".tmp") and old:
                _remove(p)
                removed.append(p)
            elif level < depth and p.is_dir() and not p.is_symlink():
                walk(p, level + 1)

    walk(folder, 1)
    return removed


def remove_stale(folder, older_than_s: float) -> list[Path]:
    """Removes every entry of `folder` older than `older_than_s` (exports nobody downloads any more)."""
    folder, now = Path(folder), time.time()
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if now - p.lstat().st_mtime > older_than_s]
    for p in stale:
        _remove(p)
    return stale
