"""The dtype, head-dim and grid rules every rung of the cupy backend shares: pure Python, no GPU needed.

`head_bucket` maps a head dim to the compiled one, `check_inputs` checks the shapes and dtypes a launch takes and
`pair_grid` lays (batch, head) pairs on the grid. config.py (the rung table) and config_hopper.py build on them.
"""
from .._arrays import dtype_str

HEAD_DIMS = (32, 64, 96, 128, 256)  # compiled head dims; others are padded up to the next (head_bucket)
MAX_GRID_YZ = 65535  # grid.y and grid.z limit (grid.x: 2**31 - 1); (batch, head) pairs go on y and z (pair_grid)
DTYPES = ("float32", "float16", "bfloat16")
CTYPE = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16"}


def head_bucket(d):
    """The compiled head dim D >= d that a head dim d (1 ... 256) runs as (zero-padded up to it)."""
    if isinstance(d, bool) or not isinstance(d, int) or not 1 <= d <= HEAD_DIMS[-1]:
        raise ValueError(f"the cupy backend takes head_dim 1 ... {HEAD_DIMS[-1]}, got {d!r}")
    return next(D for D in HEAD_DIMS if D >= d)


def pair_grid(n_tiles, BH):
    """Launch grid (n_tiles, y, z) for n_tiles tiles of each of BH (batch, head) pairs: the pairs fill grid.y up
    to its limit 65535 and continue on grid.z (the kernels' pair_index; blocks past BH return at once)."""
    if n_tiles > 2**31 - 1:
        raise ValueError(f"{n_tiles} tiles per (batch, head) pair exceed grid.x's limit 2**31 - 1")
    y = max(1, min(BH, MAX_GRID_YZ))
    z = -(-BH // y)
    if z > MAX_GRID_YZ:
        raise ValueError(f"B*H = {BH} (batch, head) pairs exceed the {MAX_GRID_YZ}**2 this launch can address")
    return (n_tiles, y, z)


def check_inputs(q, k, v, dtype):
    """Shapes q (B, H, Nq, d), k and v (B, H_kv, Nk, d) with H_kv dividing H, d in 1 ... 256, one dtype: CuPy arrays
    (bfloat16 as 16-bit integers, CuPy has no bfloat16) or torch CUDA tensors of that dtype; returns (B, H, Nq, Nk, d). The kv heads: k.shape[1]."""
    if dtype not in DTYPES:
        raise ValueError(f"the cupy backend takes dtype float32, float16 or bfloat16, got {dtype!r}")
    want = _STORED[dtype]
    for name, a in (("q", q), ("k", k), ("v", v)):
        if len(a.shape) != 4:
            raise ValueError(f"{name} must be (B, H, N, d), got shape {tuple(a.shape)}")
        if dtype_str(a.dtype) not in want:
            raise ValueError(f"{name} has dtype {a.dtype}; dtype={dtype!r} expects {' or '.join(want)}")
    B, H, Nq, d = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if tuple(k.shape) != (B, Hkv, Nk, d) or tuple(v.shape) != (B, Hkv, Nk, d) or Hkv == 0 or H % Hkv:
        raise ValueError(f"k and v must be (B, H_kv, Nk, d) = ({B}, H_kv, Nk, {d}) with H_kv dividing H = {H}; "
                         f"got {tuple(k.shape)}, {tuple(v.shape)}")
    head_bucket(d)
    if max(Nq, Nk) > 2**31 - 1:
        raise ValueError(f"sequence lengths up to 2**31 - 1 (the kernels take them as int32), got Nq={Nq}, Nk={Nk}")
    return B, H, Nq, Nk, d


# how each dtype is stored in the arrays the backend accepts: CuPy (bfloat16 as its bits) or torch
_STORED = {"float32": ("float32", "torch.float32"), "float16": ("float16", "torch.float16"),
           "bfloat16": ("int16", "uint16", "torch.bfloat16")}