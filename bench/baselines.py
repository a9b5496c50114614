"""Dense baselines shared by the bench scripts: cuDNN SDPA decode at its best, causal dense
prefill forward + backward (FlashAttention and cuDNN SDPA)."""
from __future__ import annotations

import torch

from bench.timing import note


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


def dense_prefill_fwd_bwd(q, k, v, do, row, time_fn):
    """Causal dense SDPA forward + backward over the same q [B, T, Hq, D], k, v [B, T, Hkv,
    D] (KV heads repeated for the group), upstream gradient do like q: row["flash_fwd_bwd_ms"]
    and row["cudnn_fwd_bwd_ms"] (a backend that fails is noted, not fatal); returns the
    fastest of them or None."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    group = q.shape[2] // k.shape[2]

    def heads_first(x, repeat=1):
        return x.detach().repeat_interleave(repeat, 2).transpose(1, 2).contiguous()

    qd = heads_first(q).requires_grad_()
    kd, vd = (heads_first(x, group).requires_grad_() for x in (k, v))
    dod = heads_first(do)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def dense(backend=backend):
            with sdpa_kernel([backend]):
                o = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            o.backward(dod)
        try:
            row[f"{name}_fwd_bwd_ms"] = time_fn([dense], warmup_ms=200, rep_ms=1000)
        except Exception as e:  # noqa: BLE001 - a dense backend missing is a result
            note(row, f"{name}_note", e)
    times = [row[f"{n}_fwd_bwd_ms"] for n in ("flash", "cudnn") if f"{n}_fwd_bwd_ms" in row]
    return min(times) if times else None
