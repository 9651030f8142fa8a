"""The simulator's patterns: the fast ramp equals the formula of SPEC 12 exactly."""

from __future__ import annotations

import numpy as np
import pytest

from stddaq.patterns import Noise, Ramp, ramp


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "uint32", "float32"])
@pytest.mark.parametrize("image_id", [0, 1, 9, 36_000, 2**40 + 5])
def test_fast_ramp_equals_formula(dtype: str, image_id: int) -> None:
    shape = (13, 301)
    assert np.array_equal(Ramp(shape, np.dtype(dtype)).image(image_id), ramp(image_id, shape, dtype))


def test_ramp_formula_by_hand() -> None:
    image = ramp(3, (2, 4), "uint16")
    assert image.tolist() == [[21, 22, 23, 24], [25, 26, 27, 28]]
    assert ramp(0, (1, 300), "uint8")[0, 256] == 0  # mod 2**8
    assert ramp(10_000, (1, 1), "float32")[0, 0] == float((10_000 * 7) % 2**16)


def test_noise_is_detector_like() -> None:
    noise = Noise((64, 64), np.dtype("uint16"))
    frame = noise.fill(0, np.empty((64, 64), np.uint16))
    assert 10 < frame.mean() < 5000 and frame.std() > 3
    assert not np.array_equal(noise.fill(1, np.empty((64, 64), np.uint16)), frame)
