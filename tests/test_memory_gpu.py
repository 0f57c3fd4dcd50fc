"""flashlib.bench.memory on a GPU: the peak it reports is what a call allocates, measured (issue 17).

Bounds from what each call must hold at its peak: flashlib's forward at least O and lse (and, being fused, not much
more); naive attention at least its N x N scores; Numba's float32 kernels at least O and lse through Numba's own
allocator (the `numba` share). Inputs, allocated before the call, are not counted.
"""
import pytest

pytestmark = pytest.mark.gpu

B, H, N, d = 2, 4, 1024, 64
SLACK = 2 << 20          # allocator rounding and small scratch buffers


@pytest.fixture(scope="module")
def inputs():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs torch with CUDA")
    g = torch.Generator(device="cuda").manual_seed(7)
    return tuple(torch.randn(B, H, N, d, device="cuda", dtype=torch.float16, generator=g) for _ in range(3))


def test_flashlib_forward_holds_its_outputs_and_little_more(inputs):
    import torch
    from flashlib.bench.memory import peak_extra_bytes
    from flashlib.torch import scaled_dot_product_attention as sdpa
    q, k, v = inputs
    with torch.no_grad():
        m = peak_extra_bytes(lambda: sdpa(q, k, v, backend="cupy"))
    outputs = B * H * N * d * 2 + B * H * N * 4                      # O (fp16) and lse (fp32)
    assert outputs <= m["bytes"] <= outputs + SLACK, m


def test_naive_attention_holds_its_scores(inputs):
    import torch
    from flashlib.bench.memory import peak_extra_bytes
    from flashlib.torch import naive_attention
    q, k, v = inputs
    with torch.no_grad():
        m = peak_extra_bytes(lambda: naive_attention(q, k, v, is_causal=False))
    assert m["bytes"] >= B * H * N * N * 2, m                        # S (or P) in fp16, N x N per head


def test_numba_allocations_are_counted():
    torch = pytest.importorskip("torch")
    import flashlib
    from flashlib.bench.memory import peak_extra_bytes
    from numba import cuda
    g = torch.Generator(device="cuda").manual_seed(8)
    q, k, v = (cuda.as_cuda_array(torch.randn(1, 2, 256, 64, device="cuda", generator=g)) for _ in range(3))
    m = peak_extra_bytes(lambda: flashlib.attention(q, k, v, backend="numba"))
    outputs = 1 * 2 * 256 * 64 * 4 + 1 * 2 * 256 * 4
    assert m["numba"] is not None, m                                  # Numba's manager was watched
    assert outputs <= m["bytes"] <= 4 * outputs + SLACK, m           # by Numba's allocator or torch's
