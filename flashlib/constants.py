"""The numbers every layer shares, in one place: flashlib's lowest layer (it imports nothing of flashlib).

CUDA code gets the ones it needs through flash_common.cuh (the same values, checked against these by
tests/test_constants.py) or as template arguments from the Python that launches it.
"""
import math

LOG2E = 1.4426950408889634          # log2(e): exp(x) = exp2(x * LOG2E), the kernels' folded softmax scale
LN2 = 0.6931471805599453            # ln(2): lse = m + log2(l) * LN2 back in natural-log units
NEG_INF = -math.inf                 # a masked score, and the lse of a row that sees no key

STATIC_SMEM_BYTES = 48 * 1024       # static shared memory per block; more must be opted in per kernel
# largest dynamic shared memory per block (opt-in) by compute capability, CUDA C Programming Guide, table 21
# ("Technical Specifications per Compute Capability"): maximum amount of shared memory per thread block
SMEM_OPTIN_BYTES = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 87: 163 * 1024, 89: 99 * 1024,
                    90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}


def smem_optin_bytes(cc):
    """Opt-in shared memory per block for compute capability cc (an int such as 90); for an architecture not in
    the table, the smallest of its generation's family (99 KB from sm_80 on, 48 KB before)."""
    return SMEM_OPTIN_BYTES.get(cc, 99 * 1024 if cc >= 80 else STATIC_SMEM_BYTES)


def default_scale(d):
    """The softmax scale when none is given: 1 / sqrt(head_dim), as in the paper and in PyTorch's SDPA."""
    return 1.0 / math.sqrt(d)


def attention_flops(B, H, Nq, d, causal=False, backward=False, Nk=None):
    """FLOPs of attention as FlashAttention's benchmarks count them: 4 B H Nq Nk d for the forward (two matrix
    products of 2 Nq Nk d each), half of it when causal, and 3.5x the forward for forward + backward (the backward
    is 2.5x: five matrix products)."""
    f = 4 * B * H * Nq * (Nq if Nk is None else Nk) * d / (2 if causal else 1)
    return f * (3.5 if backward else 1.0)


def backward_flops(B, H, Nq, d, causal=False, Nk=None):
    """FLOPs of the backward alone: 2.5x the forward's (attention_flops with backward=True less the forward)."""
    return attention_flops(B, H, Nq, d, causal, True, Nk) - attention_flops(B, H, Nq, d, causal, False, Nk)
