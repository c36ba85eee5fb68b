"""Crop offsets and the noise start: numpy's legacy stream, drawn in the 2016 order."""
import numpy as np
import pytest

from mfv.crops import crop_offsets, noise_start


def expected_offsets(gauss, sizes, crop, window):
    """Offsets from standard normal draws: int(clip(mid + sd * z, 0, size - crop)), rows first."""
    out, k = [], 0
    for rows, cols in sizes:
        pair = []
        for size in (rows, cols):
            mid, sd = (size - crop) / 2.0, (size - crop) * window
            pair.append(int(min(max(mid + sd * gauss[k], 0), size - crop)))
            k += 1
        out.append(tuple(pair))
    return out


def test_offsets_follow_the_noise_draws():
    seed, sizes = 5, [(272, 272)] * 40 + [(326, 326)] * 40
    rng = np.random.RandomState(seed)
    noise = noise_start(rng, 227, 227)
    got = [crop_offsets(rng, r, c, 227, 227, 0.3) for r, c in sizes]
    # the same stream as standard normals: 227*227*3 for the noise, then two per crop
    gauss = np.random.RandomState(seed).normal(0.0, 1.0, 227 * 227 * 3 + 2 * len(sizes))
    np.testing.assert_array_equal(noise, 175.0 + 8 * gauss[:227 * 227 * 3].reshape(227, 227, 3))
    assert got == expected_offsets(gauss[227 * 227 * 3:], sizes, 227, 0.3)
    assert any(o[0] in (0, 45) for o in got)  # the clip is exercised at 272 with window 0.3
    assert all(0 <= o[0] <= r - 227 and 0 <= o[1] <= c - 227 for o, (r, c) in zip(got, sizes))


def test_no_draw_when_the_image_is_not_larger():
    rng = np.random.RandomState(0)
    state = rng.get_state()
    assert crop_offsets(rng, 227, 227, 227, 227, 0.3) == (0, 0)
    after = rng.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(state, after))


@pytest.mark.caffe
def test_stream_matches_numpy_1_11(caffe_worker):
    seed, n = 3, 227 * 227 * 3 + 20
    expected = caffe_worker.py2("random_normal", seed=seed, size=[n], loc=0.0, scale=1.0)["output"]
    np.testing.assert_array_equal(np.random.RandomState(seed).normal(0.0, 1.0, n), expected)
    rng = np.random.RandomState(seed)
    noise_start(rng, 227, 227)
    got = [crop_offsets(rng, 272, 272, 227, 227, 0.3) for _ in range(10)]
    assert got == expected_offsets(expected[227 * 227 * 3:], [(272, 272)] * 10, 227, 0.3)
