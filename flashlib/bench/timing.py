"""The one timing helper of every flashlib benchmark: GPU time and host time of candidates, interleaved.

    from flashlib.bench.timing import compare
    stats = compare({"sdpa": lambda: F.scaled_dot_product_attention(q, k, v), "ours": lambda: ours(q, k, v)})
    stats["ours"]["median_ms"], stats["ours"]["spread"], stats["ours"]["host_us"]

How it measures:
- warm-up calls first (compilation, caches, allocator), then rounds; in each round every candidate is timed once,
  in an order that rotates from round to round, so clock drift and thermal changes hit all alike;
- GPU time: a batch of back-to-back calls between two CUDA events, with no synchronisation inside. A "hold" kernel
  (a spin of known length) is queued first, so the GPU waits while the host queues the whole batch: the events
  then see only GPU work, not the host's launch cost (which would dominate small kernels). Batches are sized to
  about `target_ms` of GPU work. With flush_l2=True a buffer twice the L2 size is overwritten before every call
  and each call is timed by its own pair of events (cold caches, as a first call in a model would see);
- host time: wall-clock time per call of a batch of calls with no synchronisation inside: what a caller's Python
  thread spends per call (the number that bounds small shapes); `wall_ms` adds the final synchronisation: the
  time per call as the caller sees it, host and GPU together (for eager launches against CUDA graph replay);
- rounds continue until the interquartile range of every candidate's samples is within rel_tol of its median
  (at least min_rounds, at most max_rounds or max_seconds): the spread is recorded with the median.
"""
import contextlib
import math
import statistics
import time


def compare(candidates, *, warmup=3, min_rounds=5, max_rounds=30, rel_tol=0.03, target_ms=2.0, max_batch=50,
            host=True, host_calls=50, flush_l2=False, max_seconds=60.0, clock=None, contexts=None):
    """{name: stats} for candidates {name: fn}; each fn() launches work on the current CUDA stream.

    contexts: {name: factory of a context manager} entered around that candidate's batches, outside the timed
    region (e.g. `lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)`, whose entry costs tens of microseconds).

    stats: median_ms (GPU time per call), q1_ms, q3_ms, min_ms, max_ms, spread ((q3 - q1) / median), rounds,
    batch, and with host=True host_us (median wall time per call, no sync inside the batch) with host_spread.
    """
    clock = clock or default_clock()
    names = list(candidates)
    ctx = lambda n: (contexts or {}).get(n, contextlib.nullcontext)()
    for n, fn in candidates.items():
        with ctx(n):
            for _ in range(warmup):
                fn()
    clock.sync()
    host_us = {n: [] for n in names}
    if host:
        for r in range(max(5, min_rounds)):
            for n in _rotated(names, r):
                with ctx(n):
                    host_us[n].append(_host_us(clock, candidates[n], host_calls))
    plan = {}
    for n in names:
        with ctx(n):
            plan[n] = _batch_plan(clock, candidates[n], target_ms, max_batch, flush_l2)
    samples = {n: [] for n in names}
    start = clock.now()
    for r in range(max_rounds):
        for n in _rotated(names, r):
            with ctx(n):
                samples[n].append(_gpu_ms(clock, candidates[n], *plan[n], flush_l2))
        if r + 1 >= min_rounds and (all(_spread(samples[n]) <= rel_tol for n in names)
                                    or clock.now() - start > max_seconds):
            break
    out = {}
    for n in names:
        out[n] = {**_summary(samples[n], "ms"), "rounds": len(samples[n]), "batch": plan[n][0]}
        if host:
            out[n]["host_us"] = statistics.median(host_us[n])
            out[n]["host_spread"] = _spread(host_us[n])
    return out


def time_cuda(fn, warmup=3, repeat=10, **kw):
    """Median GPU milliseconds per call of fn() on the current CUDA stream (compare with one candidate, at least
    `repeat` rounds: events around a batch of back-to-back calls queued behind a hold kernel, so host time is not
    counted)."""
    return compare({"fn": fn}, warmup=warmup, min_rounds=repeat, max_rounds=max(repeat, 30), host=False,
                   **kw)["fn"]["median_ms"]


def wall_ms(fn, warmup=3, repeat=10, calls=20, clock=None):
    """Median wall-clock milliseconds per call of fn() as its caller sees them: `calls` calls back to back and a
    synchronisation, host and GPU time together (what a CUDA graph shortens, which GPU time alone cannot show)."""
    clock = clock or default_clock()
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        clock.sync()
        t0 = clock.now()
        for _ in range(calls):
            fn()
        clock.sync()
        samples.append(1e3 * (clock.now() - t0) / calls)
    return statistics.median(samples)


def idle_events_ms(fn, warmup=3, repeat=50, clock=None):
    """Median ms between CUDA events recorded around one call of fn() on an idle GPU, synchronised after each:
    the GPU waits for the host to submit the work, so this counts the launch (chapter 1's round trip), unlike
    `compare`, whose batches are queued behind a hold."""
    clock = clock or default_clock()
    for _ in range(warmup):
        fn()
    return statistics.median(_gpu_ms(clock, fn, 1, 0.0, False) for _ in range(repeat))


def _rotated(names, r):
    k = r % len(names)
    return names[k:] + names[:k]


def _host_us(clock, fn, calls):
    clock.sync()
    t0 = clock.now()
    for _ in range(calls):
        fn()
    t1 = clock.now()
    clock.sync()
    return 1e6 * (t1 - t0) / calls


def _batch_plan(clock, fn, target_ms, max_batch, flush_l2):
    """(batch, hold_us): calls per batch for about target_ms of GPU work, and a hold long enough for the host to
    queue them (its measured wall time for the batch, doubled, plus 50 us)."""
    one = _gpu_ms(clock, fn, 1, 1000.0, flush_l2)          # one call behind a 1 ms hold: its GPU time
    batch = max(1, min(max_batch, math.ceil(target_ms / max(one, 1e-4))))
    host = _host_us(clock, fn, batch) * batch
    return batch, 2 * host + 50.0


def _gpu_ms(clock, fn, batch, hold_us, flush_l2):
    """GPU ms per call of `batch` back-to-back calls queued behind a hold of hold_us."""
    clock.sync()
    if hold_us > 0:
        clock.hold(hold_us)
    if not flush_l2:
        a, b = clock.event(), clock.event()
        clock.record(a)
        for _ in range(batch):
            fn()
        clock.record(b)
        clock.sync()
        return clock.elapsed_ms(a, b) / batch
    pairs = []
    for _ in range(batch):
        clock.flush()
        a, b = clock.event(), clock.event()
        clock.record(a)
        fn()
        clock.record(b)
        pairs.append((a, b))
    clock.sync()
    return sum(clock.elapsed_ms(a, b) for a, b in pairs) / batch


def _quartiles(xs):
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def _spread(xs):
    if not xs:
        return math.inf
    q1, q3 = _quartiles(xs)
    med = statistics.median(xs)
    return (q3 - q1) / med if med > 0 else 0.0


def _summary(xs, unit):
    q1, q3 = _quartiles(xs)
    return {f"median_{unit}": statistics.median(xs), f"q1_{unit}": q1, f"q3_{unit}": q3, f"min_{unit}": min(xs),
            f"max_{unit}": max(xs), "spread": _spread(xs)}


# ---- clocks: CUDA events, a hold kernel and an L2 flush, from PyTorch or CuPy ------------------------------------

def default_clock():
    """PyTorch's CUDA clock when torch sees a GPU, else CuPy's."""
    try:
        import torch
        if torch.cuda.is_available():
            return TorchClock()
    except ImportError:
        pass
    return CupyClock()


class TorchClock:
    """CUDA events and torch.cuda._sleep (a spin of N GPU cycles) on torch's current stream."""

    def __init__(self):
        import torch
        self.torch = torch
        self.cycles_per_us = _clock_mhz()
        self._flush = None

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, e):
        e.record()

    def elapsed_ms(self, a, b):
        return a.elapsed_time(b)

    def sync(self):
        self.torch.cuda.synchronize()

    def hold(self, us):
        self.torch.cuda._sleep(int(us * self.cycles_per_us))

    def flush(self):
        if self._flush is None:
            self._flush = self.torch.empty(2 * _l2_bytes() // 4, dtype=self.torch.float32, device="cuda")
        self._flush.zero_()

    now = staticmethod(time.perf_counter)


class CupyClock(TorchClock):
    """The same with CuPy: its events and a clock64() spin kernel on CuPy's current stream."""

    def __init__(self):
        import cupy as cp
        self.cp = cp
        self.cycles_per_us = _clock_mhz()
        self._flush = None
        self._spin = cp.RawKernel(r'''extern "C" __global__ void spin(long long cycles) {
            long long t0 = clock64(); while (clock64() - t0 < cycles) { } }''', "spin")

    def event(self):
        return self.cp.cuda.Event()

    def elapsed_ms(self, a, b):
        return self.cp.cuda.get_elapsed_time(a, b)

    def sync(self):
        self.cp.cuda.Device().synchronize()

    def hold(self, us):
        self._spin((1,), (1,), (self.cp.int64(int(us * self.cycles_per_us)),))

    def flush(self):
        if self._flush is None:
            self._flush = self.cp.empty(2 * _l2_bytes() // 4, dtype=self.cp.float32)
        self._flush.fill(0)


def _clock_mhz():
    """The GPU's SM clock in MHz (cycles per microsecond), from CuPy's device attributes; 2000 if unknown."""
    try:
        import cupy as cp
        return cp.cuda.Device().attributes["ClockRate"] / 1e3
    except Exception:
        return 2000.0


def _l2_bytes():
    try:
        import cupy as cp
        return cp.cuda.Device().attributes["L2CacheSize"]
    except Exception:
        return 64 * 2**20
