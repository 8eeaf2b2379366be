"""Schedules against the values in docs/reference-semantics.md (#temperatures, #schedules)."""
import math

import numpy as np
import pytest

from ibot_fast.schedules import cosine_scheduler, teacher_temp_schedule


# ---- teacher temperature ---------------------------------------------------------------------
def test_teacher_temp_ramp_values():
    s = teacher_temp_schedule(0.04, 0.07, 30, 100)
    assert s.shape == (100,) and s.dtype == np.float64
    assert s[0] == 0.04
    assert s[1] == pytest.approx(0.04 + 0.03 / 29, rel=1e-12)
    assert s[1] == pytest.approx(0.041034, abs=1e-6)
    assert s[29] == 0.07  # linspace includes the endpoint: the ramp ends at epoch warmup - 1
    assert s[28] < 0.07
    assert np.all(s[29:] == 0.07)
    assert np.all(np.diff(s[:30]) > 0)


def test_teacher_temp_start_epoch_holds_then_ramps():
    s = teacher_temp_schedule(0.04, 0.07, 30, 100, start_epoch=10)
    assert s.shape == (100,)
    assert np.all(s[:10] == 0.04)
    np.testing.assert_array_equal(s[10:40], np.linspace(0.04, 0.07, 30))
    assert np.all(s[39:] == 0.07)
    # start_epoch=0 is exactly the plain ramp
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 30, 100, start_epoch=0),
                                  teacher_temp_schedule(0.04, 0.07, 30, 100))


def test_teacher_temp_edge_lengths():
    np.testing.assert_array_equal(teacher_temp_schedule(0.04, 0.07, 0, 3), [0.07] * 3)
    s = teacher_temp_schedule(0.04, 0.07, 5, 5)  # ramp fills the whole run
    assert s[0] == 0.04 and s[-1] == 0.07 and len(s) == 5
    assert len(teacher_temp_schedule(0.04, 0.07, 3, 5, start_epoch=2)) == 5


def test_teacher_temp_too_short_raises():
    with pytest.raises(ValueError, match="does not fit"):
        teacher_temp_schedule(0.04, 0.07, 30, 20)
    with pytest.raises(ValueError, match="does not fit"):
        teacher_temp_schedule(0.04, 0.07, 30, 35, start_epoch=10)


# ---- cosine ----------------------------------------------------------------------------------
def test_cosine_with_warmup():
    base, final, epochs, ipe, warm = 2e-3, 1e-6, 20, 7, 3
    s = cosine_scheduler(base, final, epochs, ipe, warmup_epochs=warm)
    assert s.shape == (epochs * ipe,)
    w = warm * ipe
    assert s[0] == 0.0  # lr exactly 0 at iteration 0
    np.testing.assert_allclose(s[:w], np.linspace(0, base, w), rtol=0, atol=0)
    assert s[w - 1] == base  # peak at the end of warm-up ...
    assert s[w] == pytest.approx(base, rel=1e-15)  # ... and again at the first cosine value
    L = epochs * ipe - w
    assert s[-1] > final  # never reaches final
    assert s[-1] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (L - 1) / L)),
                                  rel=1e-12)
    assert np.all(np.diff(s[w:]) < 0)
    i = 17
    assert s[w + i] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * i / L)),
                                     rel=1e-12)


def test_cosine_without_warmup_and_increasing():
    s = cosine_scheduler(0.996, 1.0, 4, 5)  # teacher momentum: cosine up towards 1
    assert s.shape == (20,)
    assert s[0] == 0.996
    assert np.all(np.diff(s) > 0) and s[-1] < 1.0
    s = cosine_scheduler(0.04, 0.4, 3, 2)  # weight decay
    assert s[0] == pytest.approx(0.04, rel=1e-12) and s[-1] < 0.4  # 0.04 up to rounding


def test_cosine_start_warmup_value_and_errors():
    s = cosine_scheduler(1.0, 0.0, 4, 2, warmup_epochs=2, start_warmup_value=0.5)
    assert s[0] == 0.5 and s[3] == 1.0 and s[4] == 1.0
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_scheduler(1.0, 0.0, 2, 2, warmup_epochs=3)
