"""Processes and process groups: one GPU per process under NCCL, CPU processes under gloo."""
import os
import pickle
import socket
import tempfile

import torch
import torch.distributed as dist

from ..env import simulated

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0"}   # NVLink SHARP (multicast) stays off unless the caller turns it on


def use_gpu(index):
    """Make GPU `index` this process's current device for torch, CuPy and Numba: flashlib's kernels launch on
    the current device, so with one process per GPU each process must choose its own."""
    torch.cuda.set_device(index)
    try:
        import cupy
        cupy.cuda.Device(index).use()
    except ImportError:
        pass
    if not simulated():
        try:
            from numba import cuda
            cuda.select_device(index)
        except Exception:  # noqa: BLE001  (no usable Numba CUDA here: the cupy backend still works)
            pass


def _init(backend, local_rank, **kwargs):
    """dist.init_process_group; under NCCL first bind this process to GPU `local_rank` (device_id makes the
    communicator for that GPU at once, instead of guessing it at the first collective)."""
    if backend == "nccl":
        for key, value in NO_MULTICAST.items():
            os.environ.setdefault(key, value)
        use_gpu(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, **kwargs)


def init_from_env():
    """Under torchrun (RANK, LOCAL_RANK, WORLD_SIZE set): initialise the default group, NCCL on GPU LOCAL_RANK
    when this machine has CUDA, else gloo; returns the backend's name."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    _init(backend, int(os.environ.get("LOCAL_RANK", 0)))
    return backend


def rank_device():
    """This rank's device: its GPU under NCCL (the one use_gpu chose), else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank, P, backend, port, fn, args, out_dir):
    torch.set_num_threads(1)                                # P processes share the cores
    _init(backend, rank, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=P)
    try:
        result = fn(rank, P, *args)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def default_backend(nprocs):
    """'nccl' when there is a CUDA GPU for each of nprocs processes, else 'gloo' (CPU tensors)."""
    return "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"


def launch(fn, nprocs, *args, backend=None):
    """Run fn(rank, nprocs, *args) in nprocs new processes with torch.distributed initialised (NCCL on one GPU
    each, else gloo); returns the list of what fn returned on each rank. fn must be importable by name, and what
    it returns picklable (CPU objects)."""
    import torch.multiprocessing as mp
    backend = backend or default_backend(nprocs)
    if backend == "nccl" and torch.cuda.device_count() < nprocs:
        raise ValueError(f"backend 'nccl' runs one process per GPU: {nprocs} processes asked for, "
                         f"{torch.cuda.device_count()} GPUs here; use backend='gloo' (CPU tensors) or fewer processes")
    method = "fork" if backend == "gloo" and "fork" in mp.get_all_start_methods() else "spawn"
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(nprocs, backend, _free_port(), fn, args, out), nprocs=nprocs,
                           start_method=method)
        results = []
        for r in range(nprocs):
            with open(f"{out}/{r}.pkl", "rb") as f:
                results.append(pickle.load(f))
    return results
