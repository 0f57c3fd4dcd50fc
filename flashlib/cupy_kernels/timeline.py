"""Rung 7's timeline: what each warpgroup of one CTA does when, from one launch of its debug build.

fa3_timeline.cu is fa3_forward.cu compiled with FA3_TIMELINE: the elected thread (thread 0) of every warpgroup of
CTAs 0 and 1 stamps the start and end of each of its phases with %globaltimer (ns, one clock for the whole GPU)
and %clock64 (the SM's cycles) into an int64 buffer, one slot of five values per event: (phase, start_ns, end_ns,
start_clk, end_clk), TL_CAP slots per warpgroup (PTX ISA, "Special Registers: %globaltimer", "%clock64").
Producer phases: waits for a free slot (q_wait, k_wait, v_wait) and TMA issues (q_issue, k_issue, v_issue).
Consumer phases: waits for Q, K, V (wait_q, wait_k, wait_v), the ping-pong barrier (turn), issuing S = Q K^T and
P V (issue), waiting for S (wait_s), the softmax, waiting for P V (wait_pv), rescaling O (rescale), the epilogue.
`parse` (NumPy only, no GPU) turns a buffer into records; `record` runs one debug launch and parses it.
"""
import numpy as np

# the enum Fa3Phase of fa3_forward.cu, in its order (codes 1, 2, ...): tests/test_fa3_timeline.py checks them alike
PHASES = ("q_wait", "q_issue", "k_wait", "k_issue", "v_wait", "v_issue",
          "wait_q", "wait_k", "wait_v", "turn", "issue", "wait_s", "softmax", "wait_pv", "rescale", "epilogue")
PRODUCER_PHASES = PHASES[:6]
TL_CAP = 4096   # events a warpgroup (fa3_forward.cu's TL_CAP)
CTAS = 2        # the CTAs that record (0 and 1)
FIELDS = 5
# the cases benchmarks/fa3_timeline.py records for the book (d = 128, fp16): one work item a CTA without and with
# ping-pong, and the persistent grid, causal, with several items a CTA (tests/test_fa3_compile.py compiles them)
BOOK_CASES = (dict(variant="plain", causal=False, H=16, N=1024), dict(variant="pingpong", causal=False, H=16, N=1024),
              dict(variant="persistent", causal=True, H=48, N=1024))


def buffer_shape(ncw):
    """Shape of the int64 buffer of a kernel with ncw consumer warpgroups: (CTAS, ncw + 1, TL_CAP, FIELDS)."""
    return (CTAS, ncw + 1, TL_CAP, FIELDS)


def parse(buf, ncw):
    """Records of a filled buffer (any array of buffer_shape(ncw) or its flat form; unused slots are zero): a list
    of dicts cta, warpgroup (0: the producer, 1 ... ncw: consumers), lane ('producer', 'consumer 1', ...),
    phase (a PHASES name), start_ns, end_ns (from the earliest stamp of the buffer), start_clk, end_clk (cycles
    from the first stamp of the CTA's SM), in the order each warpgroup wrote them."""
    b = np.asarray(buf, dtype=np.int64).reshape(buffer_shape(ncw))
    used = b[..., 0] > 0
    if not used.any():
        return []
    t0 = b[..., 1][used].min()
    out = []
    for cta in range(CTAS):
        if not used[cta].any():
            continue
        c0 = b[cta, ..., 3][used[cta]].min()
        for wg in range(ncw + 1):
            for ev in b[cta, wg][used[cta, wg]]:
                code = int(ev[0])
                if not 1 <= code <= len(PHASES):
                    raise ValueError(f"phase code {code} in CTA {cta}, warpgroup {wg}: not one of 1 ... {len(PHASES)}")
                out.append(dict(cta=cta, warpgroup=wg, lane="producer" if wg == 0 else f"consumer {wg}",
                                phase=PHASES[code - 1], start_ns=int(ev[1] - t0), end_ns=int(ev[2] - t0),
                                start_clk=int(ev[3] - c0), end_clk=int(ev[4] - c0)))
    return out


def resolution_ns(records):
    """The smallest non-zero step between two %globaltimer stamps of the records (how fine the ns clock ticks),
    None without two distinct stamps."""
    t = np.unique([r[k] for r in records for k in ("start_ns", "end_ns")])
    return int(np.diff(t).min()) if len(t) > 1 else None


def record(B=1, H=1, N=1024, d=128, dtype="float16", causal=False, variant="pingpong", tiles=None, seed=0):
    """One launch of the debug build on random inputs (B, H, N, d) on CuPy's current GPU: (records, o, lse). The
    output is the kernel's as usual (the caller may compare it with the non-debug build's)."""
    import cupy as cp
    from .tma import fa3_config, forward_fa3
    cfg = fa3_config(dtype, d, causal, tiles, variant)
    ncw = cfg.threads // 128 - 1
    rng = cp.random.default_rng(seed)
    x = [rng.standard_normal((B, H, N, d), dtype=cp.float32) for _ in range(3)]
    if dtype == "float16":
        q, k, v = (a.astype(cp.float16) for a in x)
    else:   # bfloat16 as its high 16 bits
        q, k, v = ((a.view(cp.uint32) >> 16).astype(cp.uint16).view(cp.int16) for a in x)
    buf = cp.zeros(buffer_shape(ncw), dtype=cp.int64)
    o, lse = forward_fa3(q, k, v, causal, None, tiles, variant, _debug=buf.data.ptr)
    cp.cuda.Device().synchronize()
    return parse(cp.asnumpy(buf), ncw), o, lse
