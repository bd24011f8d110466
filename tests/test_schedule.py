"""Each schedule against values computed by hand."""

import math

import pytest

from graftlm.train.schedule import ScheduleConfig, lr_multiplier


def curve(total, **kw):
    config = ScheduleConfig(**kw)
    return [lr_multiplier(s, total, config) for s in range(total)]


def test_cosine_rewarm_then_redecay():
    lrs = curve(10, name="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lrs[:2] == [0.5, 1.0]  # linear re-warming
    # cosine over steps 2..9 (8 steps): t = (s-2)/7
    for s in range(2, 10):
        t = (s - 2) / 7
        assert lrs[s] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)


def test_warmup_fraction():
    expected = [pytest.approx((s + 1) / 10) for s in range(10)] + [1.0]
    assert curve(100, name="constant", warmup_fraction=0.1)[:11] == expected


@pytest.mark.parametrize("shape", ["linear", "cosine", "sqrt"])
def test_wsd_decay_shapes(shape):
    # 20 steps: 2 warmup, stable until step 9, decay over the last 10 (steps 10..19), min 0
    lrs = curve(20, name="wsd", warmup_steps=2, decay_fraction=0.5, decay_shape=shape, min_lr_ratio=0.0)
    assert lrs[:2] == [0.5, 1.0] and lrs[2:10] == [1.0] * 8
    assert lrs[10] == pytest.approx(1.0) and lrs[19] == pytest.approx(0.0)
    expected = {"linear": 1 - 4 / 9, "cosine": 0.5 * (1 + math.cos(math.pi * 4 / 9)), "sqrt": 1 - math.sqrt(4 / 9)}
    assert lrs[14] == pytest.approx(expected[shape])  # step 14 is 4/9 of the way through the decay


def test_wsd_with_min_ratio():
    lrs = curve(10, name="wsd", warmup_steps=0, decay_fraction=0.2, min_lr_ratio=0.1)
    assert lrs[:8] == [1.0] * 8 and lrs[8] == pytest.approx(1.0) and lrs[9] == pytest.approx(0.1)


def test_infinite_schedule_phases():
    # 20 steps: warmup 2, cooldown 4 (steps 2..5) from 1 to 0.5, constant 0.5, anneal 4 (16..19) to 0.1
    lrs = curve(20, name="infinite", warmup_steps=2, cooldown_fraction=0.2, constant_ratio=0.5,
                anneal_fraction=0.2, min_lr_ratio=0.1)
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == pytest.approx(1.0) and lrs[5] == pytest.approx(0.5)
    assert lrs[3] == pytest.approx(0.5 + 0.5 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert lrs[6:16] == [0.5] * 10
    assert lrs[16] == pytest.approx(0.5) and lrs[19] == pytest.approx(0.1)
    assert lrs[17] == pytest.approx(0.5 - 0.4 / 3)


def test_infinite_without_annealing_stays_constant():
    assert curve(10, name="infinite", warmup_steps=0, cooldown_fraction=0.0, constant_ratio=0.3) == [0.3] * 10


def test_phases_must_fit():
    with pytest.raises(ValueError, match="must not exceed 1"):
        ScheduleConfig(name="infinite", warmup_fraction=0.5, cooldown_fraction=0.4, anneal_fraction=0.2)
