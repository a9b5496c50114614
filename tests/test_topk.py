"""The topk rule (Quest / NSA): block metadata kept right on every append (contiguous and
paged), scores against independent formulations, and the generated kernels (the KV append
that folds each key into the metadata in the same launch, scoring, selection) reproducing
the reference decode exactly over many steps (block sizes 16-128, GQA groups 1-8,
upper-bound and mean-pooled, per-head and shared)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.kv_append import AppendStatic, TritonKVAppend  # noqa: E402
from sparsegen.codegen.quest_kernels import QuestStatic, TritonQuestScore  # noqa: E402
from sparsegen.methods.decode_step import TopkDecoder, reference_attend  # noqa: E402
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from sparsegen.methods.sparse_decode_ref import dense_decode_reference  # noqa: E402
from sparsegen.methods.topk import QuestMeta, quest_scores_reference  # noqa: E402
from sparsegen.spec import SelectionSpec, TopkParams, parse_spec  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402


def _sel(bs, budget_blocks, score="upper_bound", group="per_head", sink=1, local=1):
    return SelectionSpec(rule="topk", block_size=bs, sink_blocks=sink, local_blocks=local,
                         budget_tokens=budget_blocks * bs, topk=TopkParams(score, group))


def _rand(shape, gen, quantised):
    """Small integers make every score exact in fp32, whatever the summation order, so the
    kernels' selections must equal the reference's (ties included)."""
    if quantised:
        return torch.randint(-4, 5, shape, generator=gen).float()
    return torch.randn(shape, generator=gen)


def _truth(cache, b, bs):
    """Per-block min / max / mean of sequence b's keys, straight from the cache."""
    k, _ = cache.tokens(b)
    blocks = [k[i:i + bs] for i in range(0, k.shape[0], bs)]
    return (torch.stack([x.amin(0) for x in blocks]), torch.stack([x.amax(0) for x in blocks]),
            torch.stack([x.float().mean(0) for x in blocks]))


def _meta_rows(meta, cache, b, n_blocks, t):
    idx = meta.rows(cache, b, torch.arange(n_blocks))
    return t[idx]


def _state(dec, cache):
    """What an append writes: K, V, the lengths and the metadata (with the running sum)."""
    meta = dec.meta
    return [cache.k, cache.v, cache.seq_lens, *meta.tensors(),
            *([meta.run_sum] if meta.score == "mean_pooled" else [])]


def _assert_same_state(dec_a, dec_b, cache_a, cache_b):
    assert cache_a.lengths == cache_b.lengths
    for i, (a, b) in enumerate(zip(_state(dec_a, cache_a), _state(dec_b, cache_b))):
        assert torch.equal(a, b), f"state tensor {i} differs"


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
@pytest.mark.parametrize("score", ["upper_bound", "mean_pooled"])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_interp)])
def test_metadata_tracks_the_cache(layout, score, impl):
    bs, B, H, D = 16, 3, 2, 64
    gen = torch.Generator().manual_seed(0)
    cache = KVCache(B, H, D, 200, dtype=torch.float32, layout=layout, page_size=32)
    dec = TopkDecoder(_sel(bs, 4, score), 4, cache, impl=impl)
    k = torch.randn(B, 60, H, D, generator=gen)
    dec.prefill(cache, k, k, lengths=[60, 17, 32])
    for _ in range(40):  # appends interleave the sequences' pages
        kn = torch.randn(B, H, D, generator=gen)
        dec.append(cache, kn, kn)
    for b in range(B):
        n_blocks = -(-cache.lengths[b] // bs)
        mn, mx, mean = _truth(cache, b, bs)
        if score == "upper_bound":
            assert torch.equal(_meta_rows(dec.meta, cache, b, n_blocks, dec.meta.kmin), mn)
            assert torch.equal(_meta_rows(dec.meta, cache, b, n_blocks, dec.meta.kmax), mx)
        else:
            torch.testing.assert_close(_meta_rows(dec.meta, cache, b, n_blocks, dec.meta.kmean),
                                       mean, rtol=1e-5, atol=1e-6)


def test_upper_bound_bounds_every_key():
    bs, H, G, D = 32, 2, 4, 64
    gen = torch.Generator().manual_seed(1)
    cache = KVCache(1, H, D, 256, dtype=torch.float32)
    meta = QuestMeta(cache, bs)
    k = torch.randn(200, H, D, generator=gen)
    cache.extend(0, k, k)
    meta.fill(cache, 0, 0, 200)
    q = torch.randn(1, H * G, D, generator=gen)
    s = quest_scores_reference(q, meta, cache, "per_head", 7)            # [1, Hq, 7]
    dots = torch.einsum("hd,shd->hs", q[0], k.repeat_interleave(G, dim=1))
    for j in range(7):
        blk = dots[:, j * bs:(j + 1) * bs].amax(1)
        assert torch.all(s[0, :, j] >= blk - 1e-4)
    shared = quest_scores_reference(q, meta, cache, "shared", 7)
    torch.testing.assert_close(shared, s.view(1, H, G, 7).sum(2))


@needs_interp
@pytest.mark.parametrize("score,group", [("upper_bound", "per_head"), ("upper_bound", "shared"),
                                         ("mean_pooled", "per_head"), ("mean_pooled", "shared")])
@pytest.mark.parametrize("layout,dtype", [("contiguous", torch.float32), ("paged", torch.float16)])
def test_score_kernel_matches_reference(score, group, layout, dtype):
    bs, B, H, G, D = 16, 2, 2, 3, 64
    gen = torch.Generator().manual_seed(2)
    cache = KVCache(B, H, D, 300, dtype=dtype, layout=layout, page_size=64)
    meta = QuestMeta(cache, bs, score)
    for b, n in enumerate([290, 70]):
        k = torch.randn(n, H, D, generator=gen)
        cache.extend(b, k, k)
        meta.fill(cache, b, 0, n)
    q = torch.randn(B, H * G, D, generator=gen).to(dtype)
    name = {torch.float32: "fp32", torch.float16: "fp16"}[dtype]
    kern = TritonQuestScore(QuestStatic(bs, D, G, name, score, group, layout,
                                        64 if layout == "paged" else 0))
    got = kern(q, meta, cache, 19)
    want = kern.reference(q, meta, cache, 19)
    for b, nb in enumerate([19, 5]):
        torch.testing.assert_close(got[b, :, :nb], want[b, :, :nb], rtol=2e-3, atol=2e-3)


# (block, group, layout, score, group mode, quantised inputs)
LOOPS = [(16, 1, "contiguous", "upper_bound", "per_head", True),
         (16, 4, "paged", "upper_bound", "per_head", True),
         (32, 8, "contiguous", "mean_pooled", "shared", True),
         (64, 2, "paged", "mean_pooled", "per_head", True),
         (128, 4, "paged", "upper_bound", "shared", True),
         (32, 3, "contiguous", "upper_bound", "shared", False)]


@needs_interp
@pytest.mark.parametrize("bs,G,layout,score,group,quantised", LOOPS)
def test_kernels_equal_reference_over_decode(bs, G, layout, score, group, quantised):
    """Two decoders on identical inputs, one on the reference and one on the generated
    kernels (metadata update, scoring, selection): same metadata, same blocks, same output,
    every step, as blocks fill; prefill lengths are not multiples of the block."""
    B, H, D = 2, 2, 64
    gen = torch.Generator().manual_seed(bs * 10 + G)
    cap = 8 * bs
    caches = [KVCache(B, H, D, cap, dtype=torch.float32, layout=layout, page_size=2 * bs)
              for _ in range(2)]
    budget = 2 if group == "per_head" else 3  # per_head attends the union of G selections
    decs = [TopkDecoder(_sel(bs, budget, score, group), H * G, c, impl=impl)
            for c, impl in zip(caches, ("torch", "triton"))]
    lengths = [5 * bs - 6, 2 * bs + 3]
    k, v = _rand((B, lengths[0], H, D), gen, quantised), _rand((B, lengths[0], H, D), gen, False)
    for dec, cache in zip(decs, caches):
        dec.prefill(cache, k, v, lengths=lengths)
    attend = reference_attend(bs)
    for _ in range(14):
        q = _rand((B, H * G, D), gen, quantised)
        kn, vn = _rand((B, H, D), gen, quantised), _rand((B, H, D), gen, False)
        outs = []
        for dec, cache in zip(decs, caches):
            dec.append(cache, kn, vn)
            outs.append(dec.select(q, cache))
        _assert_same_state(*decs, *caches)
        (want_i, want_c), (got_i, got_c) = outs
        assert torch.equal(got_c, want_c) and torch.equal(got_i, want_i), (got_i, want_i)
        o = [attend(q, block_indices=i, block_counts=c, **cache.attention_args())
             for (i, c), cache in zip(outs, caches)]
        assert torch.equal(o[0], o[1])
    nb = (caches[0].seq_lens + bs - 1) // bs
    assert (want_c < nb[:, None]).any()  # the selection was sparse


# (block, KV heads, GQA group, layout, score, cache dtype)
APPENDS = [(16, 2, 1, "contiguous", "upper_bound", torch.float32),
           (16, 3, 4, "paged", "mean_pooled", torch.float16),
           (32, 1, 8, "paged", "upper_bound", torch.float16),
           (64, 2, 2, "contiguous", "mean_pooled", torch.float32),
           (128, 2, 4, "paged", "mean_pooled", torch.float32),
           (128, 3, 3, "contiguous", "upper_bound", torch.float16)]


@needs_interp
@pytest.mark.parametrize("bs,H,G,layout,score,dtype", APPENDS)
def test_one_launch_append_equals_torch_path_over_long_decode(bs, H, G, layout, score, dtype):
    """The decoders' append on the kernel path (K / V written and the key folded into the
    metadata in one launch, never QuestMeta.append) against the torch path (the cache's
    scatters, then QuestMeta.append): K, V, lengths and metadata equal after every step,
    over more than a block of steps from prefill lengths that are not multiples of the
    block (one empty), so every sequence opens a block mid-decode. Head dim 48 and 3 KV
    heads pad the kernel's tiles; fp32 keys go into an fp16 cache."""
    B, D = 3, 48
    gen = torch.Generator().manual_seed(bs + H * 7 + G)
    caches = [KVCache(B, H, D, 4 * bs, dtype=dtype, layout=layout, page_size=2 * bs)
              for _ in range(2)]
    decs = [TopkDecoder(_sel(bs, 2, score), H * G, c, impl=impl)
            for c, impl in zip(caches, ("torch", "triton"))]

    def no_torch_fold(*_):
        raise AssertionError("the kernel path ran the torch fold")
    decs[1].meta.append = no_torch_fold
    k = torch.randn(B, 2 * bs, H, D, generator=gen)
    for dec, cache in zip(decs, caches):
        dec.prefill(cache, k, k.flip(1), lengths=[bs + 5, 0, 2 * bs - 1])
    for _ in range(bs + 7):
        kn, vn = torch.randn(B, H, D, generator=gen), torch.randn(B, H, D, generator=gen)
        for dec, cache in zip(decs, caches):
            dec.append(cache, kn, vn)
        _assert_same_state(*decs, *caches)
    assert caches[1].lengths == [2 * bs + 12, bs + 7, 3 * bs + 6]


def test_append_static_of_quest_and_its_checks():
    st = QuestStatic(32, 128, 4, "fp16", "mean_pooled", "shared", "paged", 64)
    a = AppendStatic.of_quest(st, 8)
    assert a == AppendStatic(128, 8, "fp16", "fp16", "paged", 64, "mean_pooled", 32)
    for bad, what in (({"meta": "max"}, "meta"), ({"meta": "upper_bound"}, "block_size"),
                      ({"meta": "upper_bound", "block_size": 48, "layout": "paged",
                        "page_size": 64}, "multiple")):
        with pytest.raises(ValueError, match=what):
            AppendStatic(128, 8, **bad)
    cache = KVCache(2, 8, 128, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="meta"):  # a metadata kernel without its metadata
        cache.append(torch.randn(2, 8, 128), torch.randn(2, 8, 128), kernel=TritonKVAppend(a))
    assert cache.lengths == [0, 0]


def test_first_layers_dense_and_full_budget_is_dense():
    spec = parse_spec("""
name: q
model: {num_q_heads: 4, num_kv_heads: 2, head_dim: 64, num_layers: 4, dense_layers: [0, 1]}
cache: {layout: paged, page_size: 32}
selection: {rule: topk, block_size: 16, sink_blocks: 0, local_blocks: 1, budget_tokens: 32}
""")
    gen = torch.Generator().manual_seed(3)
    cache = KVCache(2, 2, 64, 160, dtype=torch.float32, layout="paged", page_size=32)
    dense = TopkDecoder.from_spec(spec, cache, layer=1)
    sparse = TopkDecoder.from_spec(spec, cache, layer=2)
    assert dense.dense and dense.meta is None and not sparse.dense
    k, v = torch.randn(2, 100, 2, 64, generator=gen), torch.randn(2, 100, 2, 64, generator=gen)
    dense.prefill(cache, k, v, lengths=[100, 41])
    q = torch.randn(2, 4, 64, generator=gen)
    out = dense.step(q, k[:, 0], v[:, 0], cache, reference_attend(16))
    idx, cnt = dense.select(q, cache)
    assert cnt.tolist() == [[7, 7], [3, 3]]
    kd = torch.stack([torch.cat([cache.tokens(b)[0], torch.zeros(101 - cache.lengths[b], 2, 64)])
                      for b in range(2)])
    vd = torch.stack([torch.cat([cache.tokens(b)[1], torch.zeros(101 - cache.lengths[b], 2, 64)])
                      for b in range(2)])
    torch.testing.assert_close(out, dense_decode_reference(q, kd, vd, cache.seq_lens))


def test_kernel_configs_and_compile():
    for score in ("upper_bound", "mean_pooled"):
        for dtype in ("bf16", "fp32"):
            st = QuestStatic(16, 128, 4, dtype, score, "per_head", "paged", 64)
            assert TritonQuestScore.check_config(st, TritonQuestScore.default_config(st)) is None
    st = QuestStatic(16, 128, 4, "bf16", "upper_bound", "per_head", "paged", 64)
    cfg = TritonQuestScore.default_config(st)
    assert "spills" in TritonQuestScore.check_config(st, {**cfg, "block_j": 128, "num_warps": 4})
    mean = QuestStatic(64, 128, 8, "fp16", "mean_pooled", "shared")
    for kern in (TritonQuestScore(st), TritonQuestScore(mean),
                 TritonKVAppend(AppendStatic.of_quest(st, 8)),                  # paged min/max
                 TritonKVAppend(AppendStatic.of_quest(mean, 8), {"num_warps": 4}),
                 TritonKVAppend(AppendStatic(96, 3, "bf16", "fp32", "paged", 128, "mean_pooled",
                                             64), {"num_warps": 1})):
        for f in kern.compile_sm90().values():
            assert f["cubin_bytes"] > 0 and f.get("local", 0) == 0


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
