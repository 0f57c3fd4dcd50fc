"""FlashAttention-2 in CUDA C, compiled at first use by CuPy (NVRTC) and launched from Python.

The kernels form a numbered ladder (each .cu file's header says grid, block, and what lives where):

  rung 1  'fp32'      fa2_fp32.cu   float32 on CUDA cores, online softmax, deferred normalisation
  rung 2  'tc'        fa2_tc.cu     Tensor Cores (mma.sync m16n8k16, ldmatrix), fp16/bf16, S/P/O in registers
  rung 3  'tuned'     fa2_tc.cu     + cp.async double buffering, exp2 with folded scale, 32 query rows per warp,
                                    2 blocks per SM, tiles per head dim
  rung 4  'sm75'      fa2_tc.cu     the T4 path: two m16n8k8 per k16, no cp.async, fp16 only
  rung 5  'bwd_fp32'  fa2_bwd.cu    backward on CUDA cores in fp32 arithmetic (any input dtype; float32, sm_75)
          'bwd_tc'    fa2_bwd_tc.cu backward on Tensor Cores, fp16/bf16, sm_80+, dQ by fp32 atomics
          'bwd_wgmma' fa3_backward.cu Hopper only: the backward on wgmma, TMA and a producer warpgroup (FA3's);
                                    d = 64, 128 and 256
  rung 6  'wgmma'     fa2_wgmma.cu  Hopper only (sm_90a): the forward on warpgroup MMA, K and V read by the Tensor
                                    Cores straight from shared memory; d = 64 and 128
  rung 7  'fa3'       fa3_forward.cu  Hopper only: FlashAttention-3's TMA copies (tensor maps, mbarriers), a producer
                                    warpgroup and two or three consumers (setmaxnreg), ping-pong, a persistent grid
                                    with FA3's dynamic scheduler (config_hopper.FA3_DYNAMIC); d = 64, 128, 256
  opt-in  'fa3_fp8'   fa3_fp8.cu    rung 7 with e4m3 Q, K, V (FlashAttention-3's FP8): per-head descale factors,
                                    V^T from the host, P rounded to e4m3; fp8.py quantises (optionally after a
                                    random Hadamard rotation of Q and K) and launches: forward_fp8. Never a default

The package by concern:
  shapes.py   the dtype, head-dim bucket, input-shape and grid rules every rung obeys (pure Python, no GPU needed)
  config.py   the rung table, `choose_config` and the tiles of the rungs before Hopper (pure Python)
  config_hopper.py  the Hopper rungs' tiles, signatures and instances: wgmma, fa3, bwd_wgmma (pure Python)
  build.py    NVRTC compilation per architecture, loading, and `Launcher` (cuLaunchKernel from a prepared block)
  launch.py   plans, the launch rule of each kernel, `forward` / `backward` on CuPy arrays or torch tensors
  callers.py  what launch.py needs of the caller's arrays (CuPy or torch): pointers, allocation, padding, stream
  tma.py      rung 7's tensor maps (cuTensorMapEncodeTiled through ctypes) and the rung on its own (forward_fa3)
  fp8.py      rung 'fa3_fp8': quantisation, the Hadamard rotation, V^T, its tensor maps and launch;
              fp8_tiles.py its tile table and configuration (pure Python);
              fp8_model.py a torch model of its arithmetic (tests, error table)
  timeline.py rung 7's debug build (fa3_timeline.cu): each warpgroup's phases stamped, read back as records
  flash_common.cuh, wgmma.cuh   the CUDA helpers and constants the kernels share

`forward` / `backward` follow flashlib's backend contract: q (B, H, Nq, d), k and v (B, H_kv, Nk, d) with H_kv
dividing H (grouped-query attention: query head h uses kv head h // (H // H_kv)); o like q and lse float32
(B, H, Nq). They take CuPy arrays (bfloat16 travels as 16-bit integers, its bits, and comes back the same way) or
torch CUDA tensors (any of the three dtypes), and answer in the caller's library, allocated by it and computed on
its current stream. Any head dim 1 ... 256: kernels are compiled for the buckets HEAD_DIMS and a head dim between
them is zero-padded up to the next (zero columns change no score; the padded columns of O are dropped). CuPy is
imported and the .cu files compiled only when a kernel is first launched.
"""
from .shapes import CTYPE, DTYPES, HEAD_DIMS, MAX_GRID_YZ, check_inputs, head_bucket, pair_grid
from .config import (BACKWARD_RUNGS, BWD_FALLBACK_TILES, BWD_TILES, FALLBACK_TILES, FORWARD_RUNGS, SMEM_LIMIT,
                     TUNED_TILES, Config, _cc_int, bwd_columns, choose_config, default_rung, fp32_tiles, instances,
                     smem_backward, smem_forward)
from .config_hopper import (ARCH, BWD_WGMMA_HEAD_DIMS, FA3_DEFAULT_HEAD_DIMS, FA3_HEAD_DIMS, FA3_TILES,
                            WGMMA_HEAD_DIMS, WGMMA_TILES, bwd_wgmma_config, bwd_wgmma_instances, smem_bwd_wgmma,
                            smem_wgmma, sw128)
from .build import HERE, Launcher, cuda_include_dirs, _kernel_on, _kernel_sm90a, compile_kernel, device_cc
from .fp8 import forward_fp8, forward_fp8_prepared, forward_fp8_quantized, quantize as quantize_fp8
from .launch import (Plan, backward, backward_plan, forward, forward_plan, launch_backward, launch_forward,
                     prepare_backward, prepare_forward)

GQA = ("forward", "backward")   # the kernels take k, v with fewer heads than q (argument G; flashlib.api reads this)
