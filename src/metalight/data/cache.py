"""On-disk caches of decoded splits (uint8 images, int32 token ids): `<name>.npy` (memory-mapped on load) plus a `<name>.json` sidecar.

The sidecar records the key the cache was built from (source files with sizes and mtimes, image size,
format version, ...). A cache is used only when its sidecar key equals the key of the source as it is now
and the array has the recorded shape; anything else (changed source, truncated or foreign file) is rebuilt.
Both files are written to a temporary name and moved into place with os.replace, the sidecar last, so
a crash or a concurrent reader never sees a half-written cache as valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from metalight.runs.checkpoint_io import write_text_atomically
from metalight.data.images import SplitImages
from metalight.errors import DataError

FORMAT_VERSION = 1


def cache_name(dataset: str, part: str, image_size: int, root: Path, unit: str = "px") -> str:
    """File stem of a cache: data set, part, item size (pixels, or tokens with unit="tok") and a short hash of the data root's absolute path."""
    root_hash = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    return f"{dataset}-{part}-{image_size}{unit}-{root_hash}"


def _normalized(key: dict) -> dict:
    """The key as it reads back from JSON (tuples become lists), with the format version added."""
    return json.loads(json.dumps({"format": FORMAT_VERSION, **key}))


def load_cache(cache_dir: Path, name: str, key: dict, dtype: np.dtype | type = np.uint8) -> tuple[np.ndarray, dict] | None:
    """The memory-mapped array and info dict of cache `name` when it matches `key` (and holds `dtype`), else None."""
    try:
        meta = json.loads((cache_dir / f"{name}.json").read_text())
        if meta.get("key") != _normalized(key):
            return None
        array = np.load(cache_dir / f"{name}.npy", mmap_mode="r")
    except (OSError, ValueError, EOFError):  # missing, truncated or not an .npy / JSON at all
        return None
    if array.dtype != np.dtype(dtype) or list(array.shape) != meta.get("shape"):
        return None
    return array, meta.get("info", {})


def write_cache(
    cache_dir: Path,
    name: str,
    key: dict,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
    info: dict | None = None,
    dtype: np.dtype | type = np.uint8,
) -> tuple[np.ndarray, dict]:
    """Build cache `name`: fill(out) writes a [shape] memmap of `dtype`, stored atomically with its key and info."""
    target = cache_dir / f"{name}.npy"
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
    except OSError as exc:
        raise DataError(
            f"cannot write the cache file {tmp} ({exc}): point data.cache_dir (paths.cache_dir) at a "
            f"writable folder with {np.prod(shape) * np.dtype(dtype).itemsize / 1e9:.2f} GB free."
        ) from exc
    try:
        fill(out)
        out.flush()
        del out
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    meta = {"key": _normalized(key), "shape": list(shape), "info": info or {}}
    write_text_atomically(cache_dir / f"{name}.json", json.dumps(meta))
    return np.load(target, mmap_mode="r"), meta["info"]


def cached(
    cache_dir: Path,
    name: str,
    key: dict,
    shape: tuple[int, ...],
    fill: Callable[[np.ndarray], None],
    info: dict | None = None,
) -> tuple[np.ndarray, dict]:
    """Cache `name` if it matches `key`, else build it with write_cache (for sources whose shape is known up front)."""
    hit = load_cache(cache_dir, name, key)
    return hit if hit is not None else write_cache(cache_dir, name, key, shape, fill, info)


def cached_grouped(
    cache_dir: Path,
    name: str,
    key: dict,
    classes: Sequence[str],
    counts: Sequence[int],
    image_shape: tuple[int, int, int],
    fill: Callable[[np.ndarray], None],
) -> SplitImages:
    """A flat cache [sum(counts), C, H, W] holding each class's images in turn: loaded, or built by fill(out).

    For classes with different numbers of images; the class names and counts are part of the key.
    """
    key = {**key, "classes": list(classes), "counts": [int(c) for c in counts]}
    info = {"classes": list(classes), "counts": [int(c) for c in counts]}
    array, info = cached(cache_dir, name, key, (int(sum(counts)), *image_shape), fill, info)
    return SplitImages.grouped(info["classes"], array, info["counts"])
