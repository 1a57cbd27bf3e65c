"""Statistics and timers, driven by synthetic samples and clocks (no real time is measured)."""

import math

import pytest
import torch

from infermeter.measure.timing import Stats, percentile, time_cuda, time_host, timer_for


def test_percentiles_match_numpy_linear():
    np = pytest.importorskip("numpy")
    values = [3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0]
    ordered = sorted(values)
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(ordered, q) == pytest.approx(np.percentile(values, q))


def test_stats_of_known_samples():
    s = Stats.of([10.0, 10.0, 10.0, 10.0, 20.0])
    assert s.median == 10.0 and s.min == 10.0 and s.max == 20.0 and s.n == 5
    assert s.mean == 12.0
    assert s.cov == pytest.approx(math.sqrt(16.0) / 12.0)  # population std 4 over mean 12
    assert s.p90 == pytest.approx(16.0)


def test_stats_warnings():
    assert Stats.of([1.0] * 10).warnings("copy") == []
    noisy = Stats.of([1.0, 2.0] * 5)
    assert any("noisy" in w for w in noisy.warnings("copy"))
    assert any("only 2 samples" in w for w in Stats.of([1.0, 1.0]).warnings("copy"))
    with pytest.raises(ValueError):
        Stats.of([])


def test_time_host_with_a_synthetic_clock():
    ticks = iter([0.0, 0.5, 1.0, 1.002, 2.0, 2.004])  # warm-up 500 ms, then 2 ms and 4 ms
    calls = []
    samples, warmup_ms = time_host(lambda: calls.append(1), repeats=2, warmup=1,
                                   clock=lambda: next(ticks))
    assert warmup_ms == pytest.approx(500.0)
    assert samples == pytest.approx([2.0, 4.0])
    assert len(calls) == 3


def test_the_timer_for_a_device_is_cuda_events_on_a_gpu_and_the_host_clock_elsewhere():
    assert timer_for(torch.device("cuda", 0)) is time_cuda
    assert timer_for(torch.device("cpu")) is time_host
