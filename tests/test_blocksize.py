"""The adaptive block-size controller on a synthetic load trace."""

import pytest

from sdrm.blocksize import BlockSizeController


def test_trace_halves_then_recovers():
    controller = BlockSizeController(target_ms=10.0, max_block=196, block_size=128, patience=3)
    trace = [5.0] * 2 + [14.0] * 6 + [7.0] * 10 + [2.0] * 9
    sizes = [controller.update(ms) for ms in trace]
    assert sizes[:2] == [128, 128]
    assert 64 in sizes
    assert 32 in sizes
    assert min(sizes) == 32
    # 7 ms is inside the band (between 5 and 10 ms): no change.
    assert sizes[8:18] == [32] * 10
    assert sizes[-1] == 196


def test_single_spike_does_not_flip():
    controller = BlockSizeController(target_ms=10.0, max_block=196, block_size=64, patience=3)
    trace = [8.0, 30.0, 8.0, 30.0, 8.0, 30.0, 8.0]
    assert {controller.update(ms) for ms in trace} == {64}


def test_memory_pressure_shrinks():
    controller = BlockSizeController(target_ms=100.0, max_block=128, block_size=128, patience=2)
    for _ in range(4):
        size = controller.update(1.0, memory_fraction=0.95)
    assert size == 32


def test_bounds_hold():
    controller = BlockSizeController(target_ms=10.0, max_block=40, block_size=16, patience=1)
    for _ in range(10):
        controller.update(100.0)
    assert controller.block_size == 16
    for _ in range(10):
        controller.update(0.1)
    assert controller.block_size == 40


@pytest.mark.parametrize("kwargs", [{"target_ms": 0}, {"target_ms": 1, "min_block": 0}, {"target_ms": 1, "max_block": 8}])
def test_invalid_settings_raise(kwargs):
    settings = {"max_block": 64, **kwargs}
    with pytest.raises(ValueError):
        BlockSizeController(**settings)
