"""Octave schedules: Python 2 arithmetic as the 2016 code ran it, Python 3 as a naive port runs it."""
from fractions import Fraction

import pytest

from mfv import schedule
from mfv.schedule import CENTER_BIAS_OCTAVES, MEAN_OCTAVES, denoise_weight, py2_div, step_size


def test_py2_div_floors_integers_only():
    assert py2_div(7, 2) == 3 and py2_div(-7, 2) == -4       # Python 2: floor, toward -inf
    assert py2_div(7.0, 2) == 3.5 and py2_div(7, 2.0) == 3.5
    assert isinstance(py2_div(6, 3), int)
    assert py2_div(True, 2) == 0.5                             # bools are not counted as integers


def test_mean_octave_zero_keeps_step_one_under_python2():
    octave = MEAN_OCTAVES[0]  # integer steps 1 -> 2 over 190 iterations
    py2 = [step_size(octave, i, "py2") for i in range(octave.iter_n)]
    py3 = [step_size(octave, i, "py3") for i in range(octave.iter_n)]
    assert py2 == [1] * 190 and all(isinstance(s, int) for s in py2)
    # Python 3 ramps: 1 + i/190 (to the rounding of i/190 and of the sum)
    assert py3 == pytest.approx([float(1 + Fraction(i, 190)) for i in range(190)], rel=0, abs=3e-16)
    assert py3[-1] == pytest.approx(1.9947368421052631, abs=0)


def test_float_octaves_agree_between_arithmetics():
    for octave in MEAN_OCTAVES[1:] + CENTER_BIAS_OCTAVES:
        for i in (0, 1, octave.iter_n // 2, octave.iter_n - 1):
            assert step_size(octave, i, "py2") == step_size(octave, i, "py3")
            assert denoise_weight(octave, i, "py2") == denoise_weight(octave, i, "py3")


def test_denoise_weight_formula_as_written():
    octave = MEAN_OCTAVES[1]  # 0.01 -> 2 over 150: start - (start - end * i) / n
    for i in (0, 1, 75, 149):
        expected = 0.01 - (0.01 - 2 * i) / 150
        assert denoise_weight(octave, i) == expected
    assert denoise_weight(octave, 0) == pytest.approx(0.009933333333333334, abs=1e-18)
    assert denoise_weight(octave, 149) == pytest.approx(1.9966, abs=1e-12)
    last = CENTER_BIAS_OCTAVES[-1]  # step 6 -> 3 over 10: 6 - 3i/10, to double rounding
    for i in range(10):
        assert step_size(last, i) == pytest.approx(float(6 - Fraction(3 * i, 10)), rel=0, abs=1e-15)


def test_tables_match_the_published_hyperparameters():
    assert [(o.margin, o.window, o.scale, o.iter_n) for o in MEAN_OCTAVES] == \
        [(0, 0.3, None, 190), (0, 0.3, 1.2, 150), (50, 0.2, 1.0, 20), (0, 0.3, None, 10)]
    assert [o.layer for o in CENTER_BIAS_OCTAVES] == ["prob", "prob", "fc8", "fc8", "fc8"]
    assert sum(o.iter_n for o in MEAN_OCTAVES) == 370 and sum(o.iter_n for o in CENTER_BIAS_OCTAVES) == 530
    assert isinstance(MEAN_OCTAVES[0].start_step_size, int) and isinstance(MEAN_OCTAVES[1].start_step_size, float)
    assert schedule.octaves_for("center-bias") is CENTER_BIAS_OCTAVES
    with pytest.raises(ValueError):
        schedule.octaves_for("median")
    with pytest.raises(ValueError):
        step_size(MEAN_OCTAVES[0], 0, "py4")
