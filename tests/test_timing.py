"""flashlib.bench.timing on the CPU: a fake clock models a GPU queue (work starts when both the host has queued it
and the GPU is free), so the helper's logic is checked without a GPU: host time kept out of GPU time, batches,
interleaving, spread, stopping, L2 flush."""
import itertools

import pytest

from flashlib.bench import timing


class FakeClock:
    """Host time and a GPU timeline in ms. A launch costs `host_ms` on the host and queues `gpu_ms` of GPU work."""

    def __init__(self):
        self.host = 0.0
        self.gpu = 0.0
        self.calls = []

    def launch(self, gpu_ms, host_ms, name=None):
        self.host += host_ms
        self.gpu = max(self.gpu, self.host) + gpu_ms
        if name:
            self.calls.append(name)

    def event(self):
        return {}

    def record(self, e):
        self.host += 0.001
        e["t"] = max(self.gpu, self.host)
        self.gpu = e["t"]

    def elapsed_ms(self, a, b):
        return b["t"] - a["t"]

    def sync(self):
        self.host = max(self.host, self.gpu)

    def hold(self, us):
        self.launch(us / 1e3, 0.002)

    def flush(self):
        self.launch(0.5, 0.002)

    def now(self):
        return self.host / 1e3


def test_gpu_time_excludes_host_time_and_host_time_is_measured():
    clock = FakeClock()
    small = lambda: clock.launch(gpu_ms=0.010, host_ms=0.030)          # host-bound: 30 us to queue 10 us of work
    out = timing.compare({"small": small}, clock=clock, warmup=2)["small"]
    assert out["median_ms"] == pytest.approx(0.010, rel=1e-6)
    assert out["host_us"] == pytest.approx(30.0, rel=1e-3)
    assert out["batch"] > 1 and out["spread"] == pytest.approx(0.0, abs=1e-9)


def test_without_a_hold_events_would_count_host_time():
    """The reason for the hold: the same batch timed by events alone reads the host's 30 us per call."""
    clock = FakeClock()
    small = lambda: clock.launch(gpu_ms=0.010, host_ms=0.030)
    assert timing._gpu_ms(clock, small, 20, 0.0, False) == pytest.approx(0.030, rel=0.05)
    assert timing._gpu_ms(clock, small, 20, 1000.0, False) == pytest.approx(0.010, rel=1e-6)


def test_candidates_interleaved_in_rotating_rounds():
    clock = FakeClock()
    fns = {n: (lambda n=n: clock.launch(0.1, 0.01, n)) for n in "abc"}
    timing.compare(fns, clock=clock, warmup=0, host=False, min_rounds=3, max_rounds=3, max_batch=1)
    timed = clock.calls[-9:]                     # the three rounds, one call each (batch 1)
    assert timed == list("abc") + list("bca") + list("cab")


def test_rounds_continue_while_noisy_and_spread_is_recorded():
    clock = FakeClock()
    steady = lambda: clock.launch(0.2, 0.01)
    noise = itertools.cycle([0.1, 0.3, 0.2, 0.5, 0.15])
    noisy = lambda: clock.launch(next(noise), 0.01)
    out = timing.compare({"steady": steady}, clock=clock, min_rounds=4, max_rounds=12, max_batch=1)
    assert out["steady"]["rounds"] == 4 and out["steady"]["median_ms"] == pytest.approx(0.2)
    out = timing.compare({"noisy": noisy}, clock=clock, min_rounds=4, max_rounds=12, max_batch=1)
    assert out["noisy"]["rounds"] == 12 and out["noisy"]["spread"] > 0.3
    assert out["noisy"]["min_ms"] <= out["noisy"]["q1_ms"] <= out["noisy"]["median_ms"] <= out["noisy"]["q3_ms"]


def test_batch_sized_to_target_and_flush_not_counted():
    clock = FakeClock()
    fn = lambda: clock.launch(0.25, 0.01)
    out = timing.compare({"f": fn}, clock=clock, target_ms=2.0, host=False)["f"]
    assert out["batch"] == 8 and out["median_ms"] == pytest.approx(0.25)
    out = timing.compare({"f": fn}, clock=clock, target_ms=2.0, host=False, flush_l2=True)["f"]
    assert out["median_ms"] == pytest.approx(0.25)         # the 0.5 ms flush before each call is outside the events


def test_time_cuda_is_the_median():
    clock = FakeClock()
    assert timing.time_cuda(lambda: clock.launch(0.07, 0.2), clock=clock) == pytest.approx(0.07)


def test_contexts_are_entered_outside_the_timed_region():
    clock = FakeClock()
    inside = []

    class Slow:
        def __enter__(self):
            clock.host += 5.0                       # 5 ms to enter, like a costly sdpa_kernel(...) context
            inside.append(True)

        def __exit__(self, *exc):
            inside.pop()

    fn = lambda: clock.launch(0.1, 0.02) if inside else pytest.fail("called outside its context")
    out = timing.compare({"f": fn}, clock=clock, contexts={"f": Slow})["f"]
    assert out["median_ms"] == pytest.approx(0.1) and out["host_us"] == pytest.approx(20.0, rel=1e-3)


def test_wall_time_counts_host_and_gpu():
    clock = FakeClock()
    assert timing.wall_ms(lambda: clock.launch(0.010, 0.030), clock=clock) == pytest.approx(0.030, rel=0.05)
    assert timing.wall_ms(lambda: clock.launch(0.5, 0.030), clock=clock) == pytest.approx(0.5, rel=0.01)


def test_idle_events_count_the_hosts_submission():
    clock = FakeClock()
    assert timing.idle_events_ms(lambda: clock.launch(0.002, 0.008), clock=clock) == pytest.approx(0.010, abs=5e-4)
