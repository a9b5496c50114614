"""Dense baselines shared by the bench scripts: cuDNN SDPA decode at its best."""
from __future__ import annotations

import torch


def cudnn_decode_variants(qs, k, v):
    """Dense GQA decode through cuDNN SDPA in each formulation a server might use, as
    (name, [one call per q]). q [B, Hq, D]; k, v [B, S, Hkv, D] (any strides).

    fold: the group folded into the query length, q [B, Hkv, G, D], over the cache viewed
    head-major; gqa: q [B, Hq, 1, D] with enable_gqa on the same view; gqa-hm: the same on a
    head-major contiguous copy. Their speeds differ by up to 7x (fold is slow at batch 1).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    sdpa = torch.nn.functional.scaled_dot_product_attention
    B, Hq, D = qs[0].shape
    Hkv = k.shape[2]
    kv_view = (k.transpose(1, 2), v.transpose(1, 2))

    def fold(q, kk, vv):
        return sdpa(q.view(B, Hkv, Hq // Hkv, D), kk, vv).view(B, Hq, D)

    def gqa(q, kk, vv):
        return sdpa(q.view(B, Hq, 1, D), kk, vv, enable_gqa=True).view(B, Hq, D)

    def bind(fn, q, kk, vv):
        def run():
            with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
                return fn(q, kk, vv)
        return run
    yield "fold", [bind(fold, q, *kv_view) for q in qs]
    yield "gqa", [bind(gqa, q, *kv_view) for q in qs]
    kv_hm = (kv_view[0].contiguous(), kv_view[1].contiguous())
    yield "gqa-hm", [bind(gqa, q, *kv_hm) for q in qs]
    del kv_hm


def fastest_cudnn_decode(qs, k, v, time_fn):
    """(name, calls, ms) of the fastest formulation by time_fn(calls) (e.g. time_graph)."""
    best = None
    for name, calls in cudnn_decode_variants(qs, k, v):
        try:
            ms = time_fn(calls)
        except Exception:  # a formulation cuDNN rejects for this shape
            continue
        if best is None or ms < best[2]:
            best = (name, calls, ms)
    if best is None:
        raise RuntimeError("no cuDNN SDPA formulation ran")
    return best
