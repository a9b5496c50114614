"""The entmax summary append's check against the torch path, shared by the interpreter test
(tests/test_summary_append.py) and the GPU one (tests/test_entmax_graph_gpu.py); imports no
Triton and sets no TRITON_INTERPRET."""
import torch

from sparsegen.codegen.summary_append import TritonSummaryAppend
from sparsegen.methods.entmax import EntmaxDecoder, EntmaxPool, EntmaxRule, block_summaries
from sparsegen.methods.kv_cache import KVCache


def _decoder_pair(B, Hkv, D, bs, cap, dtype, layout, page_size, w, device):
    rule = EntmaxRule(block_size=bs, sink_blocks=1, local_blocks=1)
    out = {}
    for impl in ("triton", "torch"):
        cache = KVCache(B, Hkv, D, cap, dtype=dtype, layout=layout, page_size=page_size,
                        device=device)
        dec = EntmaxDecoder(rule, Hkv, Hkv, D, pool=EntmaxPool(Hkv, D, w), append_impl=impl)
        out[impl] = (dec, cache)
    return out


# block 128 at D 128 runs its softmax over four chunks; block 16 at D 64 over one
CASES = [  # B, Hkv, D, bs, dtype, layout, page_size, prompt lengths, steps
    (3, 2, 64, 16, torch.float32, "contiguous", 0, [5, 16, 31], 40),
    (2, 8, 128, 64, torch.bfloat16, "paged", 64, [63, 100], 70),
    (2, 1, 128, 128, torch.float32, "paged", 256, [120, 0], 140),
    (4, 3, 64, 32, torch.bfloat16, "contiguous", 0, [0, 1, 31, 64], 36),
]


def case_id(c) -> str:
    return f"B{c[0]}-H{c[1]}-D{c[2]}-bs{c[3]}-{str(c[4])[6:]}-{c[5]}"


def check_summary_append(case, device="cpu") -> None:
    """Decode `steps` tokens after mixed-length prompts through the one-launch append and
    through the torch path; the cache and lengths equal, the summaries within a rounding of
    the cache dtype of each other and of an fp64 pooling of every full block, and none
    written past them."""
    B, Hkv, D, bs, dtype, layout, page_size, prompt, steps = case
    g = torch.Generator(device=device).manual_seed(B * 100 + bs)
    cap = max(prompt) + steps + 1
    w = 0.4 * torch.randn(Hkv, D, generator=g, device=device)
    pair = _decoder_pair(B, Hkv, D, bs, cap, dtype, layout, page_size, w, device)
    pk = torch.randn(B, max(max(prompt), 1), Hkv, D, generator=g, device=device).to(dtype)
    for dec, cache in pair.values():
        dec.prefill(cache, pk, pk, lengths=prompt)
    (tdec, tcache), (rdec, rcache) = pair["triton"], pair["torch"]
    kern = tdec._summary_append(tcache, dtype)
    assert isinstance(kern, TritonSummaryAppend)
    filled = 0
    for t in range(steps):
        kv = torch.randn(2, B, Hkv, D, generator=g, device=device).to(dtype)
        filled += sum((n + 1) % bs == 0 for n in rcache.lengths)
        for dec, cache in pair.values():
            cache.append(kv[0], kv[1], **({"meta": (dec.summaries, w), "kernel": kern}
                                          if dec is tdec else {}))
            if dec is rdec:
                dec._after_append(cache)
    assert filled >= B, "the case should fill blocks"
    assert torch.equal(tcache.seq_lens, rcache.seq_lens) and tcache.lengths == rcache.lengths
    assert torch.equal(tcache.k, rcache.k) and torch.equal(tcache.v, rcache.v)
    # fp32 online softmax vs torch's two-pass one: equal up to a rounding of the output dtype
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(tdec.summaries, rdec.summaries, rtol=tol, atol=tol)
    # and both equal an independent fp64 pooling of the cache's full blocks
    for b, n in enumerate(rcache.lengths):
        kk, _ = rcache.tokens(b)
        want = block_summaries(kk[None].double(), w.double(), bs)[0]  # [Hkv, n // bs, D]
        got = tdec.summaries[b, :, : n // bs].double()
        torch.testing.assert_close(got, want, rtol=2 * tol, atol=2 * tol)
        assert not tdec.summaries[b, :, n // bs:].any(), "no summary past the full blocks"
