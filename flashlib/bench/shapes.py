"""The benchmarks' workload: batch and head counts at each sequence length N, defined once.

B * N = TOKENS (16k) tokens, as in FlashAttention-2's benchmarks (Dao 2023, Section 4.1, which sets the batch
size so that the total number of tokens is 16k), and H = HEADS = 16 heads at every head dimension, so every N
does comparable work."""
TOKENS = 16384
HEADS = 16


def workload(N, tokens=TOKENS, heads=HEADS):
    """(B, H) at sequence length N: B = max(1, tokens // N), H = heads."""
    return max(1, tokens // N), heads


DESCRIPTION = f"B = {TOKENS} / N, H = {HEADS}"    # for a record's info and the book's captions
