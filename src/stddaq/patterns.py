"""Image patterns of the simulator, as pure functions anyone can recompute (SPEC section 12).

``ramp``: pixel (y, x) of image ``image_id`` = ``(image_id * 7 + y * W + x) mod 2**bits`` where
bits is the dtype's width; for float32 the same integer computed mod 2**16, as a float.
"""

from __future__ import annotations

import numpy as np


def _modulus_dtype(dtype: np.dtype) -> np.dtype:
    """The unsigned integer type whose wrap-around is the ramp's modulus."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f":
        return np.dtype("<u2")
    if dtype.kind in "ui":
        return np.dtype(f"<u{dtype.itemsize}")
    raise ValueError(f"no ramp for dtype {dtype}")


class Ramp:
    """Writes ramp images at memcpy speed.

    Image ``id`` is the window ``[k, k + H*W)`` of the sequence ``n mod 2**bits`` with
    ``k = 7*id mod 2**bits``; for 8 and 16 bit moduli that sequence is precomputed once and an
    image is one copy. For 32 bit a precomputed base is offset with a wrap-around add instead.
    """

    def __init__(self, shape: tuple[int, int], dtype: np.dtype) -> None:
        self.shape = shape
        self.dtype = np.dtype(dtype)
        self._int = _modulus_dtype(self.dtype)
        self._modulus = 1 << (8 * self._int.itemsize)
        n_pixels = shape[0] * shape[1]
        if self._modulus <= 1 << 16:
            self._sequence = (np.arange(self._modulus + n_pixels, dtype=np.uint32) % self._modulus).astype(self.dtype)
        else:
            self._sequence = None
            self._base = (np.arange(n_pixels, dtype=np.uint64) % self._modulus).astype(self._int).reshape(shape)
        self._n_pixels = n_pixels

    def fill(self, image_id: int, out: np.ndarray) -> np.ndarray:
        k = (image_id * 7) % self._modulus
        if self._sequence is not None:
            np.copyto(out, self._sequence[k:k + self._n_pixels].reshape(self.shape))
            return out
        return np.add(self._base, self._int.type(k), out=out)

    def image(self, image_id: int) -> np.ndarray:
        return self.fill(image_id, np.empty(self.shape, self.dtype))


def ramp(image_id: int, shape: tuple[int, int], dtype: np.dtype | str) -> np.ndarray:
    """The ramp image ``image_id`` (reference implementation, written for clarity)."""
    height, width = shape
    dtype = np.dtype(dtype)
    modulus = 1 << (8 * _modulus_dtype(dtype).itemsize)
    y, x = np.indices((height, width), dtype=np.uint64)
    return ((np.uint64(image_id) * np.uint64(7) + y * np.uint64(width) + x) % np.uint64(modulus)).astype(dtype)


class Noise:
    """Poisson-like detector frames: a dim background with bright spots, cycled from a few
    precomputed frames (generating Poisson noise per image would be the bottleneck)."""

    def __init__(self, shape: tuple[int, int], dtype: np.dtype, n_frames: int = 4, seed: int = 1234) -> None:
        dtype = np.dtype(dtype)
        rng = np.random.default_rng(seed)
        height, width = shape
        y, x = np.indices(shape)
        top = float(np.iinfo(dtype).max) if dtype.kind in "ui" else 65535.0
        signal = np.full(shape, 20.0)
        for cy, cx, amp in zip(rng.uniform(0, height, 12), rng.uniform(0, width, 12), rng.uniform(200, 4000, 12), strict=False):
            signal += amp * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * (0.02 * max(shape)) ** 2 + 1))
        frames = [np.clip(rng.poisson(signal), 0, top).astype(dtype) for _ in range(n_frames)]
        self.frames = frames

    def fill(self, image_id: int, out: np.ndarray) -> np.ndarray:
        np.copyto(out, self.frames[image_id % len(self.frames)])
        return out
