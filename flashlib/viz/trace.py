"""What a step-through's trace implies, step by step: the HBM bytes per tensor, the tiles' status, and the
gradients rebuilt from the backward's tiles (plain NumPy; `stepthrough` draws them)."""
import numpy as np

from ..constants import NEG_INF

TENSORS = {"fa1": ("Q", "K", "V", "O", "l", "m"), "fa2": ("Q", "K", "V", "O", "lse"),
           "bwd": ("Q", "K", "V", "O", "dO", "lse", "D", "dQ", "dK", "dV")}


def _elements(rec, name, i, j):
    """Elements of tensor `name`'s tile in step (i, j): rows of block i (Q, O, dO, dQ: times d; l, m, lse, D: one
    per row) or keys of block j (K, V, dK, dV: times d)."""
    rows = min(rec["Br"], rec["Nq"] - i * rec["Br"])
    cols = min(rec["Bc"], rec["Nk"] - j * rec["Bc"])
    if name in ("K", "V", "dK", "dV"):
        return cols * rec["d"]
    return rows * rec["d"] if name in ("Q", "O", "dO", "dQ") else rows


def tensor_bytes(rec, step):
    """{tensor: [bytes read, bytes written]} between HBM and SRAM after steps 0..step, from the names each step
    of the trace loaded and wrote and the tiles' shapes (plus the writes and reads before the first step:
    FA1 initialises O, l, m in HBM; the backward's pre-pass reads dO, O and writes D, zeroes dQ; FA1's and the backward's
    K_j, V_j are read at the start of each column that has a visible tile)."""
    out = {t: [0, 0] for t in TENSORS[rec["algo"]]}
    Nq, d, it = rec["Nq"], rec["d"], rec["itemsize"]
    if rec["algo"] == "fa1":
        out["O"][1], out["l"][1], out["m"][1] = Nq * d * it, Nq * it, Nq * it
    if rec["algo"] == "bwd":
        out["dO"][0], out["O"][0], out["D"][1], out["dQ"][1] = Nq * d * it, Nq * d * it, Nq * it, Nq * d * it
    seen, active = set(), {st["j"] for st in rec["steps"] if not st["skipped"]}
    for st in rec["steps"][:step + 1]:
        kv_outer = rec["algo"] in ("fa1", "bwd")            # K_j, V_j read once, before column j's inner loop
        if kv_outer and st["j"] in active and st["j"] not in seen:
            seen.add(st["j"])
            for name in ("K", "V"):
                out[name][0] += _elements(rec, name, st["i"], st["j"]) * it
        for name in st.get("loaded", ()):
            if not (kv_outer and name in ("K", "V")):
                out[name][0] += _elements(rec, name, st["i"], st["j"]) * it
        for name in st.get("written", ()):
            out[name][1] += _elements(rec, name, st["i"], st["j"]) * it
    return out


def replay(rec, step):
    """State after steps 0..step-1: tile status (Tr, Tc), visit order, O rows and m rows as last written."""
    status = np.zeros((rec["Tr"], rec["Tc"]), int)            # 0 pending, 1 done, 2 skipped, 3 now
    order = np.zeros((rec["Tr"], rec["Tc"]), int)
    O = np.full((rec["Nq"], rec["d"]), np.nan)
    m = np.full(rec["Nq"], NEG_INF)
    for n, st in enumerate(rec["steps"][:step + 1]):
        i, j = st["i"], st["j"]
        status[i, j], order[i, j] = (2 if st["skipped"] else 1), n + 1
        if n == step:
            status[i, j] = 2 if st["skipped"] else 3
            break
        if not st["skipped"] and "O" in st:
            rows = slice(i * rec["Br"], i * rec["Br"] + st["O"].shape[0])
            O[rows], m[rows] = st["O"], st["m"]
    return status, order, O, m


def gradients(rec, step):
    """dQ, dK, dV of a backward record after steps 0..step, rebuilt from the trace's P and dS tiles:
    dV_j += P^T dO_i, dK_j += scale dS^T Q_i, dQ_i += scale dS K_j."""
    Br, Bc = rec["Br"], rec["Bc"]
    dq, dk, dv = np.zeros(rec["q"].shape), np.zeros(rec["k"].shape), np.zeros(rec["v"].shape)
    for st in rec["steps"][:step + 1]:
        if st["skipped"]:
            continue
        r, c = slice(st["i"] * Br, (st["i"] + 1) * Br), slice(st["j"] * Bc, (st["j"] + 1) * Bc)
        dv[c] += st["P"].T @ rec["do"][r]
        dk[c] += rec["scale"] * st["dS"].T @ rec["q"][r]
        dq[r] += rec["scale"] * st["dS"] @ rec["k"][c]
    return dq, dk, dv
