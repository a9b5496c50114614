"""The milestone rule (RaaS): the paged decoder against an independent plain-Python reference
over long randomized decodes (same evictions, same selections, same outputs, memory bounded
by prefill + budget pages), threshold refresh, the hybrid with top-k over the prefill, and
the Triton page-scoring kernel under TRITON_INTERPRET=1.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.milestone_kernels import (MilestoneScoreTriton,  # noqa: E402
                                                 MilestoneSelectStatic, MilestoneSelectTriton,
                                                 MilestoneStatic)
from sparsegen.codegen.milestone_open import (MilestoneOpenStatic,  # noqa: E402
                                              MilestoneOpenTriton)
from sparsegen.methods.kv_cache import CacheFullError, KVCache  # noqa: E402
from sparsegen.methods.milestone import (MilestoneDecoder, MilestoneRule,  # noqa: E402
                                         rank_order, torch_page_scores)
from sparsegen.spec import load_spec  # noqa: E402
from tests.interp import (needs_interp, only_if_not_interpreted,  # noqa: E402
                          rerun_in_interpreter)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("single_thread")


class NaiveMilestone:
    """The rule written out plainly over the full token history (no pages, no slots):
    dicts of timestamps, min/max recomputed from the tokens, Python sorting, dense softmax."""

    def __init__(self, rule: MilestoneRule, G: int, prefill_len):
        self.r, self.G = rule, G
        self.pre = list(prefill_len)
        self.pre_pages = [math.ceil(n / rule.page_size) for n in prefill_len]
        self.n = list(prefill_len)
        self.ts = [dict() for _ in prefill_len]  # live decode page -> timestamp
        self.t = 0

    def _minmax(self, K, b, page):
        P = self.r.page_size
        toks = K[b, page * P: min((page + 1) * P, self.n[b])]
        return toks.amin(0), toks.amax(0)  # [Hkv, D]

    def _bound(self, q_h, K, b, page, h):
        lo, hi = self._minmax(K, b, page)
        return float(torch.maximum(q_h * lo[h], q_h * hi[h]).sum())

    def step(self, q, K, V):
        r, P = self.r, self.r.page_size
        self.t += 1
        evicted = []
        for b in range(len(self.n)):
            if self.n[b] % P == 0:
                if len(self.ts[b]) == r.budget_pages:
                    victim = min(self.ts[b], key=lambda p: (self.ts[b][p], p))
                    del self.ts[b][victim]
                    evicted.append((b, victim))
                self.ts[b][self.n[b] // P] = self.t
            self.n[b] += 1
        Hq, D = q.shape[1], q.shape[2]
        Hkv = Hq // self.G
        for b in range(len(self.n)):  # refresh
            pages = sorted(self.ts[b])
            score = {p: 0.0 for p in pages}
            for hq in range(Hq):
                bounds = torch.tensor([self._bound(q[b, hq], K, b, p, hq // self.G) / math.sqrt(D)
                                       for p in pages], dtype=F64)
                for p, pr in zip(pages, torch.softmax(bounds, 0).tolist()):
                    score[p] += pr / Hq
            if r.refresh_threshold is not None:
                hit = [p for p in pages if score[p] > r.refresh_threshold]
            else:
                ranked = sorted(pages, key=lambda p: (-score[p], p))
                hit = ranked[: math.ceil(r.refresh_fraction * len(pages))]
            cur = (self.n[b] - 1) // P
            for p in hit + ([cur] if cur in self.ts[b] else []):
                self.ts[b][p] = self.t
        sels, out = {}, torch.zeros(q.shape, dtype=F64)
        bpp, bs = r.blocks_per_page, r.block_size
        for b in range(len(self.n)):
            nb = math.ceil(self.n[b] / bs)
            held = set(range(self.pre_pages[b])) | set(self.ts[b])
            for h in range(Hkv):
                if r.hybrid:
                    qsum = q[b, h * self.G:(h + 1) * self.G]
                    sc = {p: sum(self._bound(qq, K, b, p, h) for qq in qsum)
                          for p in range(self.pre_pages[b])}
                    top = sorted(sc, key=lambda p: (-sc[p], p))[: r.prefill_pages_kept]
                    blocks = {p * bpp + i for p in top for i in range(bpp)}
                    forced = set(range(r.sink_blocks)) | set(range(nb - r.local_blocks, nb))
                    blocks |= {j for j in forced if j >= 0 and j // bpp in held}
                else:
                    blocks = {p * bpp + i for p in range(self.pre_pages[b]) for i in range(bpp)}
                blocks |= {p * bpp + i for p in self.ts[b] for i in range(bpp)}
                blocks = sorted(j for j in blocks if j < nb)
                sels[b, h] = blocks
                pos = torch.tensor([j * bs + i for j in blocks for i in range(bs)
                                    if j * bs + i < self.n[b]])
                for hq in range(h * self.G, (h + 1) * self.G):
                    logits = K[b, pos, h] @ q[b, hq] / math.sqrt(D)
                    out[b, hq] = torch.softmax(logits, 0) @ V[b, pos, h]
        return out, sels, evicted


def run_pair(rule, steps, pre, *, B=2, Hkv=2, G=2, D=16, seed=0, check_every=1, scorer=None,
             attend=None, dtype=F64):
    """Drive the decoder and the naive reference side by side; returns the decoder."""
    g = torch.Generator().manual_seed(seed)
    P = rule.page_size
    cap = max(pre) + steps + P
    K = torch.randn(B, cap, Hkv, D, generator=g, dtype=F64)
    V = torch.randn(B, cap, Hkv, D, generator=g, dtype=F64)
    bound = [math.ceil(n / P) + rule.budget_pages for n in pre]
    # exactly the memory the rule may use: a leak or a late eviction raises CacheFullError
    cache = KVCache(B, Hkv, D, cap, dtype=dtype, layout="paged", page_size=P,
                    num_pages=sum(bound))
    dec = MilestoneDecoder(rule, Hkv * G, Hkv, D, compute_dtype=dtype, scorer=scorer)
    dec.prefill(cache, K[:, : max(pre)].to(dtype), V[:, : max(pre)].to(dtype), lengths=pre)
    ref = NaiveMilestone(rule, G, pre)
    n_evicted = 0
    for t in range(steps):
        # queries that sometimes favour old pages, sometimes recent ones
        q = torch.randn(B, Hkv * G, D, generator=g, dtype=F64) * (0.5 + (t % 5))
        idx = [ref.n[b] for b in range(B)]
        k_new = torch.stack([K[b, idx[b]] for b in range(B)]).to(dtype)
        v_new = torch.stack([V[b, idx[b]] for b in range(B)]).to(dtype)
        out = dec.step(q.to(dtype), k_new, v_new, cache, attend=attend)
        want, sels, evicted = ref.step(q, K, V)
        assert dec.last_evictions == evicted, t
        assert all(p >= ref.pre_pages[b] for b, p in evicted), "a prefill page was evicted"
        n_evicted += len(evicted)
        assert cache.pages_in_use() <= sum(bound)
        if t % check_every == 0 or t == steps - 1:
            for b in range(B):
                assert dec.decode_pages(b) == sorted(ref.ts[b]), (t, b)
                assert dec.timestamps(b) == ref.ts[b], (t, b)
            idx_, counts = dec.last_selection
            for (b, h), blocks in sels.items():
                assert idx_[b, h, : int(counts[b, h])].tolist() == blocks, (t, b, h)
            tol = 1e-9 if dtype == F64 else 1e-4
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol)
    assert n_evicted == dec.num_evictions > 0
    return dec, cache


def test_long_decode_fraction_matches_reference():
    rule = MilestoneRule(page_size=8, block_size=4, budget_tokens=32, refresh_fraction=0.5)
    dec, cache = run_pair(rule, 2500, [13, 6], check_every=5)
    # memory: every sequence holds its prefill pages and exactly the budget
    assert cache.pages_in_use() == 2 + 1 + 2 * rule.budget_pages
    assert dec.num_evictions >= 2 * (2500 // 8 - rule.budget_pages) - 2


def test_threshold_refresh_matches_reference():
    rule = MilestoneRule(page_size=8, block_size=8, budget_tokens=40, refresh_fraction=None,
                         refresh_threshold=0.15)
    run_pair(rule, 600, [16, 3], seed=1, check_every=3)


def test_hybrid_topk_over_prefill_matches_reference():
    rule = MilestoneRule(page_size=8, block_size=4, budget_tokens=24, refresh_fraction=0.3,
                         prefill_budget_tokens=16, sink_blocks=1, local_blocks=2)
    dec, _ = run_pair(rule, 800, [61, 29], seed=2, check_every=4)
    idx, counts = dec.last_selection
    # prefill: sink block + 2 kept pages (4 blocks) at most, plus the decode pages
    assert int(counts.max()) <= 1 + 2 * rule.blocks_per_page + rule.budget_pages * 2 + 2


def test_memory_stays_flat_while_dense_would_grow():
    rule = MilestoneRule(page_size=16, block_size=16, budget_tokens=64, refresh_fraction=0.5)
    B, Hkv, G, D = 1, 1, 2, 16
    cache = KVCache(B, Hkv, D, 4096, dtype=torch.float32, layout="paged", page_size=16,
                    num_pages=2 + rule.budget_pages)
    dec = MilestoneDecoder(rule, Hkv * G, Hkv, D)
    g = torch.Generator().manual_seed(3)
    dec.prefill(cache, torch.randn(B, 20, Hkv, D, generator=g),
                torch.randn(B, 20, Hkv, D, generator=g))
    use = []
    for _ in range(1500):
        dec.step(torch.randn(B, Hkv * G, D, generator=g), torch.randn(B, Hkv, D, generator=g),
                 torch.randn(B, Hkv, D, generator=g), cache)
        use.append(cache.pages_in_use())
    assert max(use) == 2 + rule.budget_pages and max(use[200:]) == min(use[200:])
    with pytest.raises(CacheFullError):  # without eviction the same pool runs out at once
        plain = KVCache(B, Hkv, D, 4096, layout="paged", page_size=16,
                        num_pages=2 + rule.budget_pages)
        for _ in range(1500):
            plain.append(torch.randn(B, Hkv, D), torch.randn(B, Hkv, D))


@needs_interp
def test_score_kernel_matches_torch():
    B, Hkv, G, D, L = 3, 2, 4, 32, 40
    g = torch.Generator().manual_seed(4)
    q = torch.randn(B, Hkv * G, D, generator=g)
    kmin = torch.randn(100, Hkv, D, generator=g)
    kmax = kmin + torch.rand(100, Hkv, D, generator=g)
    slot = torch.randint(0, 100, (B, L), generator=g, dtype=torch.int32)
    slot[0, 5:9] = -1
    slot[2] = -1  # a sequence with no decode page yet
    kern = MilestoneScoreTriton(MilestoneStatic(D, G, "fp32"), {"slot_chunk": 16, "num_warps": 4})
    got = kern(q, kmin, kmax, slot)
    want = torch_page_scores(q.double(), kmin.double(), kmax.double(), slot)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert got[2].abs().sum() == 0 and torch.allclose(got[:2].sum(-1), torch.ones(2))


@needs_interp
def test_decoder_on_triton_kernels_matches_reference():
    """The GPU path: Triton page scoring and the Triton sparse decode over the paged cache
    (fp32 in the interpreter), same evictions and selections as the reference."""
    from sparsegen.codegen.backend import decode_backend
    from sparsegen.codegen.decode_api import DecodeStatic

    rule = MilestoneRule(page_size=16, block_size=16, budget_tokens=32, refresh_fraction=0.5)
    D, G = 16, 2
    st = DecodeStatic(16, D, G, "fp32", "paged", 16)
    be = decode_backend("triton")
    attend = be(st, {**be.default_config(st), "block_n": 16, "num_warps": 2, "num_stages": 1})
    scorer = MilestoneScoreTriton(MilestoneStatic(D, G, "fp32"), {"slot_chunk": 16,
                                                                  "num_warps": 2})
    run_pair(rule, 50, [20, 9], D=D, G=G, seed=5, scorer=scorer, attend=attend,
             dtype=torch.float32)


def _fast_vs_general(rule, pre, steps, *, Hkv=2, G=3, D=16, seed=0):
    """One randomized decode driven through two decoders on two identical caches: the fast
    path (bounds kernel + one refresh/select launch, the block rows kept by the decoder) and
    the general path (torch ranking by two stable sorts, sort-and-dedupe selection) fed the
    page scores the fast path ranked by, so every selection, eviction and timestamp must
    agree exactly, ties included: most pages are copies of one of the first three, so they
    share their min/max and their score exactly."""
    g = torch.Generator().manual_seed(seed)
    B, P = len(pre), rule.page_size
    cap = max(pre) + steps + P
    cap = -(-cap // P) * P
    K = torch.randn(B, cap // P, P, Hkv, D, generator=g)
    rep = torch.rand(B, cap // P, 1, 1, 1, generator=g) < 0.6  # pages copied from page 0..2
    K = torch.where(rep, K[:, torch.arange(cap // P) % 3], K).reshape(B, cap, Hkv, D)
    V = torch.randn(B, cap, Hkv, D, generator=g)
    scorer = MilestoneScoreTriton(MilestoneStatic(D, G, "fp32"), {"slot_chunk": 8,
                                                                  "num_warps": 1})
    decs, caches = [], []
    for fast in (True, False):
        pool = sum(math.ceil(n / P) + rule.budget_pages for n in pre)
        cache = KVCache(B, Hkv, D, cap, dtype=torch.float32, layout="paged", page_size=P,
                        num_pages=pool)
        dec = MilestoneDecoder(rule, Hkv * G, Hkv, D, fast=fast, scorer=scorer if fast else (
            lambda q, kmin, kmax, slot: decs[0].last_scores.clone()))
        dec.prefill(cache, K[:, : max(pre)], V[:, : max(pre)], lengths=pre)
        decs.append(dec), caches.append(cache)
    fast, gen = decs
    assert fast.fast and not gen.fast and isinstance(fast.selector, MilestoneSelectTriton)
    uploads = []  # the steps at which the fast path copied host values to the device
    upload = fast._upload
    fast._upload = lambda values: uploads.append(t) or upload(values)
    evictions = 0
    for t in range(steps):
        q = torch.randn(B, Hkv * G, D, generator=g) * (0.5 + (t % 4))
        pos = [caches[0].lengths[b] for b in range(B)]
        assert fast.capturable(caches[0]) and not gen.capturable(caches[1]), t
        kv = [torch.stack([X[b, pos[b]] for b in range(B)]) for X in (K, V)]
        outs = [dec.step(q, kv[0], kv[1], cache) for dec, cache in zip(decs, caches)]
        # every fast step, page openings and evictions included, is device work only (a
        # CUDA graph can hold it): the timestamps below, which read the step number, check
        # its on-device advance, the block tables and slots the opening kernel's choices
        assert not uploads, t
        assert fast.last_evictions == gen.last_evictions, t
        evictions += len(fast.last_evictions)
        for name in ("slot_logical", "slot_ts", "slot_phys", "_refresh_k"):
            assert torch.equal(getattr(fast, name), getattr(gen, name)), (name, t)
        assert torch.equal(caches[0].block_table, caches[1].block_table), t
        # the fast path's append (K / V and the page min/max in one launch, block = page)
        # vs the cache's append and the torch fold
        assert torch.equal(fast.kmin, gen.kmin) and torch.equal(fast.kmax, gen.kmax), t
        for name in ("k", "v", "seq_lens"):
            assert torch.equal(getattr(caches[0], name), getattr(caches[1], name)), (name, t)
        (fi, fc), (gi, gc) = fast.last_selection, gen.last_selection
        assert torch.equal(fc, gc), t
        for b in range(B):
            for h in range(Hkv):
                n = int(fc[b, h])
                assert torch.equal(fi[b, h, :n], gi[b, h, :n]), (t, b, h)
                if not rule.hybrid:  # the fast path pads with -1 too
                    assert (fi[b, h, n:] == -1).all(), (t, b, h)
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    assert evictions == fast.num_evictions == gen.num_evictions > 0
    # the host's copy of the block table, read back where the device changed it
    assert all(caches[0].physical_page(b, p) == caches[1].physical_page(b, p)
               for b in range(B) for p in range(cap // P))
    if not rule.hybrid:  # select() with no pending refresh: the selection-only launch
        assert fast._pending is None
        idx, counts = fast.select(None, caches[0])
        assert torch.equal(idx, fi) and torch.equal(counts, fc)
    return fast


@needs_interp
@pytest.mark.parametrize("mode", ["fraction", "threshold", "hybrid"])
def test_fast_path_matches_general_path(mode):
    """Batch of mixed prefill lengths (one ending mid-page, one empty, one on a page
    boundary), pages of 2 blocks (partly filled pages), evictions from early on."""
    kw = {"fraction": dict(refresh_fraction=0.4),
          "threshold": dict(refresh_fraction=None, refresh_threshold=0.3),
          "hybrid": dict(refresh_fraction=0.5, prefill_budget_tokens=16, sink_blocks=1,
                         local_blocks=2)}[mode]
    steps = {"fraction": 72, "threshold": 40, "hybrid": 40}[mode]
    rule = MilestoneRule(page_size=8, block_size=4, budget_tokens=24, **kw)
    dec = _fast_vs_general(rule, [29, 0, 16], steps, seed={"fraction": 6, "threshold": 7,
                                                           "hybrid": 8}[mode])
    assert dec.num_evictions >= 3 * (steps // 8 - rule.budget_pages) - 3


@needs_interp
@pytest.mark.parametrize("rank_sort", [0, 1])
def test_refresh_kernel_ranks_like_torch(rank_sort):
    """The refresh kernel alone, both rankings ([L, L] comparison, bitonic sort), against
    rank_order on the kernel's own scores: holes, unordered logical pages, exact score ties
    (duplicated bound columns), k = 0 and k past the live count."""
    B, Hq, L, P = 5, 6, 12, 8
    g = torch.Generator().manual_seed(10)
    bounds = torch.randn(B, Hq, L, generator=g) * 3
    bounds[1, :, 2] += 8  # sequence 1: three tied top pages, k = 2 (a tie at the cut)
    bounds[:, :, 7] = bounds[:, :, 2]
    bounds[:, :, 9] = bounds[:, :, 2]
    logical = torch.stack([torch.randperm(L, generator=g) + 4 for _ in range(B)])
    logical[1] = torch.arange(L + 3, 3, -1)  # its current page (the last) is slot 0
    logical[0, [1, 5]] = -1
    logical[3] = -1  # no live page
    bounds = bounds.masked_fill(logical[:, None, :] < 0, float("-inf"))
    live = logical >= 0
    refresh_k = torch.tensor([0, 2, 5, 4, 40])
    seq = ((logical.max(-1).values.clamp_min(0) * P) + 3).to(torch.int32)
    ts = torch.randint(0, 50, (B, L), generator=g)
    t_now = torch.tensor([99])
    sel = MilestoneSelectTriton(MilestoneSelectStatic(L), {
        "head_chunk": 4, "block_chunk": 16, "rank_sort": rank_sort, "num_warps": 1})
    got_ts, scores = ts.clone(), torch.empty(B, L)
    assert sel.refresh(bounds, logical, got_ts, refresh_k, seq, t_now, P,
                       scores=scores) is None
    assert torch.equal(scores, sel.scores(bounds))
    want = torch.softmax(bounds * math.log(2), -1).nan_to_num(0).mean(1)  # bounds: log2 units
    torch.testing.assert_close(scores, want.masked_fill(~live, 0), rtol=1e-5, atol=1e-6)
    order = rank_order(scores.masked_fill(~live, float("-inf")),
                       torch.where(live, logical, 1 << 40))
    take = torch.arange(L)[None, :] < refresh_k[:, None]
    hit = torch.zeros_like(live).scatter(-1, order, take) & live
    hit |= live & (logical == ((seq.long() - 1) // P)[:, None])
    assert torch.equal(got_ts, torch.where(hit, 99, ts))
    assert scores[1, 7] == scores[1, 2] == scores[1, 9] and hit[1].tolist() == [
        s in (0, 7, 9) for s in range(L)]  # the tie goes to the lower logical pages


def test_capture_any_fast_step_and_refuse_the_general_path(monkeypatch):
    """capturable(cache, steps): the fast path, any steps (its page openings and evictions
    are decided on the device); the general path's step is refused inside a capture before
    it changes anything, and so is its replayed()."""
    from sparsegen.methods import milestone

    rule = MilestoneRule(page_size=8, block_size=4, budget_tokens=16)
    fast = MilestoneDecoder(rule, 4, 2, 16, scorer=MilestoneScoreTriton(
        MilestoneStatic(16, 2, "fp32")))
    general = MilestoneDecoder(rule, 4, 2, 16)
    cache = KVCache(2, 2, 16, 64, dtype=torch.float32, layout="paged", page_size=8)
    cache.lengths = [8, 9]
    assert fast.capturable(cache, 40) and not general.capturable(cache)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        fast.capturable(cache, 0)
    with pytest.raises(ValueError, match="general path's steps cannot be captured"):
        general.replayed(cache, 3)
    monkeypatch.setattr(milestone, "capturing", lambda t: True)
    q, kv = torch.zeros(2, 4, 16), torch.zeros(2, 2, 16)
    with pytest.raises(RuntimeError, match="general path uploads host values"):
        general.step(q, kv, kv, cache)
    assert cache.lengths == [8, 9] and general.t == 0


@needs_interp
def test_replayed_brings_the_host_record_to_the_device():
    """After steps the host did not see (a replayed graph's, emulated here by eager steps
    whose host record is then put back), replayed(cache, steps) gives the host the record
    the eager steps left: token counts, step number, live pages, evictions counted, and the
    block-table rows the opening kernel changed (read back when asked for); where the steps
    overrun the cache it raises and changes nothing."""
    rule = MilestoneRule(page_size=8, block_size=4, budget_tokens=16)  # 2 decode slots
    scorer = MilestoneScoreTriton(MilestoneStatic(16, 2, "fp32"), {"slot_chunk": 8,
                                                                  "num_warps": 1})
    g = torch.Generator().manual_seed(12)
    cache = KVCache(3, 2, 16, 96, dtype=torch.float32, layout="paged", page_size=8)
    dec = MilestoneDecoder(rule, 4, 2, 16, scorer=scorer)
    k = torch.randn(3, 9, 2, 16, generator=g)
    dec.prefill(cache, k, torch.randn_like(k), lengths=[5, 9, 0])
    with pytest.raises(ValueError, match="prefill a fresh cache"):
        dec.prefill(cache, k, torch.randn_like(k))

    def record():
        return (list(cache.lengths), dec.t, list(dec._live), dec.num_evictions,
                set(cache._stale_rows))

    def steps(n):
        for _ in range(n):
            dec.step(torch.randn(3, 4, 16, generator=g), torch.randn(3, 2, 16, generator=g),
                     torch.randn(3, 2, 16, generator=g), cache)

    steps(3)
    before = record()
    steps(37)  # every sequence opens pages, fills its 2 slots and evicts
    after = record()
    assert after[3] > 0 and after[2] == [2, 2, 2]
    cache.lengths, dec.t, dec._live, dec.num_evictions, cache._stale_rows = (
        list(before[0]), before[1], list(before[2]), before[3], set(before[4]))
    dec.replayed(cache, 37)
    assert record()[:4] == after[:4]
    table = cache.block_table.tolist()
    assert all(cache.physical_page(b, p) == table[b][p] for b in range(3) for p in range(12))
    with pytest.raises(CacheFullError, match="made for 96"):
        dec.replayed(cache, 60)
    assert record()[:4] == after[:4]
    # a step past the capacity raises before the opening kernel writes the block table
    steps(96 - max(cache.lengths))
    full, table = record(), cache.block_table.clone()
    with pytest.raises(CacheFullError, match="made for 96"):
        steps(1)
    assert record() == full and torch.equal(cache.block_table, table)


def test_open_kernel_compiles_for_sm90():
    """The page-opening kernel for the shapes a spec can give: the example's 128 slots of
    one block a page, pages of 2 / 3 blocks (a padded block tile), threshold refresh, the
    hybrid (no selection row)."""
    for static in (MilestoneOpenStatic(128, 1, True, True),
                   MilestoneOpenStatic(5, 2, True, True),
                   MilestoneOpenStatic(64, 3, False, True),
                   MilestoneOpenStatic(16, 4, True, False)):
        facts = MilestoneOpenTriton(static).compile_sm90()["milestone_open"]
        assert facts["cubin_bytes"] > 0 and facts.get("local", 0) == 0, (static, facts)
    with pytest.raises(ValueError, match="slots must be a positive int"):
        MilestoneOpenStatic(0, 1, True, True)


def test_configs_and_spec():
    st = MilestoneStatic(128, 4, "bf16")
    cfg = MilestoneScoreTriton.default_config(st)
    assert MilestoneScoreTriton.check_config(st, cfg) is None
    assert "spills" in MilestoneScoreTriton.check_config(st, {"slot_chunk": 128, "num_warps": 1})
    spec = load_spec(ROOT / "examples/specs/raas-milestone.yaml")
    rule = MilestoneRule.from_spec(spec)
    assert (rule.budget_pages, rule.page_size, rule.refresh_fraction, rule.hybrid) == (
        128, 16, 0.5, False)
    dec = MilestoneDecoder.from_spec(spec)
    assert dec.num_kv_heads == 8
    with pytest.raises(ValueError):
        MilestoneRule(refresh_fraction=0.5, refresh_threshold=0.1)
    with pytest.raises(ValueError):  # the rule needs the paged layout
        dec.prefill(KVCache(1, 8, 128, 64), torch.zeros(1, 4, 8, 128), torch.zeros(1, 4, 8, 128))


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
