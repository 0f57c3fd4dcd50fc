"""Launch overhead and CUDA Graphs (chapter 13): capture work into a graph and time eager launches against replay.

Each helper takes a function that only launches GPU work on tensors it does not reallocate, as capture requires.
"""
import torch

from .timing import wall_ms


def graph_of(fn, warmup=3):
    """Capture fn() (which must only launch work on fixed tensors) into a torch.cuda.CUDAGraph; returns it.

    PyTorch's recipe: warm up on a side stream (lazy initialisation must not happen inside the capture), then
    capture; `graph.replay()` launches every captured kernel with one CPU call.
    """
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def eager_vs_graph(fn, n_kernels, repeat=20):
    """ms of fn() launched kernel by kernel vs the same work replayed from a CUDA graph, and the speed-up: wall time
    per call including the host's launches (timing.wall_ms), which is what a graph saves."""
    eager = wall_ms(fn, repeat=repeat)
    graph = graph_of(fn)
    replay = wall_ms(graph.replay, repeat=repeat)
    per = (lambda ms: 1e3 * ms / n_kernels) if n_kernels else (lambda ms: None)
    return {"n_kernels": n_kernels, "eager_ms": eager, "graph_ms": replay, "speedup": eager / replay,
            "eager_us_per_kernel": per(eager), "graph_us_per_kernel": per(replay)}


def elementwise_chain(numel, n_ops, device="cuda"):
    """fn() launching n_ops tiny elementwise kernels in a row on one tensor of numel float32 values."""
    x = torch.zeros(numel, device=device)

    def fn():
        for _ in range(n_ops):
            x.mul_(0.5).add_(1.0)                      # two kernels; x stays bounded (fixed point 2)
    return fn, 2 * n_ops


def cupy_eager_vs_graph(numel, n_ops, repeat=20):
    """The same chain in CuPy, captured with Stream.begin_capture() / end_capture() and replayed with launch()."""
    import cupy as cp
    x = cp.zeros(numel, dtype=cp.float32)

    def fn():
        for _ in range(n_ops):
            cp.multiply(x, 0.5, out=x)
            cp.add(x, 1.0, out=x)
    fn()
    eager = wall_ms(fn, repeat=repeat)
    stream = cp.cuda.Stream(non_blocking=True)     # the legacy default stream cannot be captured
    with stream:
        stream.begin_capture()
        fn()
        graph = stream.end_capture()
    replay = wall_ms(graph.launch, repeat=repeat)
    n = 2 * n_ops
    return {"n_kernels": n, "eager_ms": eager, "graph_ms": replay, "speedup": eager / replay,
            "eager_us_per_kernel": 1e3 * eager / n, "graph_us_per_kernel": 1e3 * replay / n}
