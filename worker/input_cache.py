"""Decoded input images a worker keeps: bulk jobs often send one source image many times
(many prompts or seeds over one picture), and its GET + decode is per-job work otherwise.

Only content-addressed inputs are cached (``s3://<bucket>/inputs/<sha256>[-<w>x<h>].<ext>``,
as ``Storage.put_input`` writes them): their key names their bytes, so a hit is never stale.
Images are shared between jobs read-only (every pipeline preprocesses into new arrays).
"""
from __future__ import annotations

import threading
from typing import Callable

from cachetools import LRUCache
from PIL import Image

from easel.shared.storage import is_input_key


def _nbytes(img: Image.Image) -> int:
    """Its pixels' memory: Pillow keeps 3- and 4-band pixels in 4 bytes."""
    bands = len(img.getbands())
    return img.width * img.height * (4 if bands >= 3 else bands)


class InputCache:
    def __init__(self, max_mb: int, bucket: str):
        # Named by their content only in easel's own bucket (``Storage.put_input``): an
        # ``inputs/`` key of another bucket may be overwritten by its owner.
        self._own = f"s3://{bucket}/"
        self._lru: LRUCache | None = LRUCache(maxsize=max_mb * 2**20, getsizeof=_nbytes) if max_mb > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, ref: str, load: Callable[[], Image.Image]) -> Image.Image:
        """The decoded image for ``ref``: cached if content-addressed, else ``load()`` each time."""
        if self._lru is None or not (ref.startswith(self._own) and is_input_key(ref[len(self._own):])):
            return load()
        with self._lock:
            img = self._lru.get(ref)
        if img is not None:
            self.hits += 1
            return img
        self.misses += 1
        img = load()
        if _nbytes(img) <= self._lru.maxsize:
            with self._lock:
                self._lru[ref] = img
        return img
