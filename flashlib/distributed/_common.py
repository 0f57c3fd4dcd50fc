"""What the ring and Ulysses share: the process group's rank and size, input checks, the counters."""
import torch
import torch.distributed as dist

from ..constants import default_scale
from ..torch import cupy_allocates_from_torch, resolve_backend

STATS = {}   # phase (forward, backward, ulysses_forward, ulysses_backward) -> counters of the latest call, this rank


def group_info(group):
    """(rank, world size) in `group`; a clear error when torch.distributed is not initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call dist.init_process_group first "
                           "(or flashlib.distributed.launch, or init_from_env under torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def acc_dtype(x):
    """The dtype of the running state and the dK/dV accumulators: float64 for float64 input, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_cuda(q, k, v):
    """flashlib's kernels (CuPy, Numba) launch on the current device's default stream, and NCCL orders its
    transfers after torch's current stream: the tensors must live on the current device, used from its default
    stream, or kernels and transfers would race."""
    devices = {str(t.device) for t in (q, k, v)}
    if len(devices) > 1:
        raise ValueError(f"q, k, v must be on one device, got {sorted(devices)}")
    index, current = q.device.index, torch.cuda.current_device()
    import cupy
    if index != current or cupy.cuda.Device().id != index:
        raise RuntimeError(f"the tensors are on cuda:{index}, but torch's current device is cuda:{current} and "
                           f"CuPy's is {cupy.cuda.Device().id}; flashlib's kernels launch on the current device: "
                           f"call flashlib.distributed.use_gpu({index}) first (one GPU per process)")
    if torch.cuda.current_stream(q.device) != torch.cuda.default_stream(q.device):
        raise RuntimeError("flashlib.distributed runs its kernels on the default CUDA stream; call it outside "
                           "`with torch.cuda.stream(...)`")


def prepare(q, k, v, scale, backend):
    """Check this rank's shards; returns (q, k, v) contiguous, the scale and the resolved backend."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise TypeError(f"{name} must be a 4-d torch tensor (batch, heads, local seq, head_dim), got "
                            f"{type(t).__name__} of shape {tuple(getattr(t, 'shape', ()))}")
    if not (q.shape[2] == k.shape[2] == v.shape[2] and k.shape == v.shape):
        raise ValueError(f"q, k, v must hold the same positions: shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)} (local lengths must agree, and k, v must match)")
    if q.is_cuda or k.is_cuda or v.is_cuda:
        _check_cuda(q, k, v)
        cupy_allocates_from_torch()           # one allocator for torch, the cupy kernels and the merge
    backend = resolve_backend(q, backend)
    scale = default_scale(q.shape[3]) if scale is None else scale
    return q.contiguous(), k.contiguous(), v.contiguous(), scale, backend
