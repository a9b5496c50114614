"""KVCache: appends land where the attention reference reads them, pages are reused; the
fused Triton append (interpreter) writes exactly what the torch scatters write."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.kv_append import AppendStatic, TritonKVAppend  # noqa: E402
from sparsegen.methods import kv_cache  # noqa: E402
from sparsegen.methods.kv_cache import CacheFullError, KVCache  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402


@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_mixed_length_appends_read_back(layout):
    g = torch.Generator().manual_seed(0)
    cache = KVCache(3, 2, 8, capacity=100, dtype=torch.float32, layout=layout, page_size=16)
    truth = [[], [], []]
    for b, n in enumerate([37, 1, 64]):
        k, v = torch.randn(n, 2, 8, generator=g), torch.randn(n, 2, 8, generator=g)
        cache.extend(b, k, v)
        truth[b].append((k, v))
    for _ in range(20):
        k, v = torch.randn(3, 2, 8, generator=g), torch.randn(3, 2, 8, generator=g)
        cache.append(k, v)
        for b in range(3):
            truth[b].append((k[b:b + 1], v[b:b + 1]))
    for b in range(3):
        want_k = torch.cat([t[0] for t in truth[b]])
        got_k, got_v = cache.tokens(b)
        assert torch.equal(got_k, want_k)
        assert torch.equal(got_v, torch.cat([t[1] for t in truth[b]]))
    assert cache.seq_lens.tolist() == [57, 21, 84]


def test_released_page_is_reused_and_stays_evicted():
    cache = KVCache(1, 1, 4, capacity=64, dtype=torch.float32, layout="paged", page_size=16,
                    num_pages=3)
    cache.extend(0, torch.randn(48, 1, 4), torch.randn(48, 1, 4))
    assert cache.pages_in_use() == 3
    with pytest.raises(CacheFullError):
        cache.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    freed = cache.release_page(0, 1)
    cache.append(torch.randn(1, 1, 4), torch.randn(1, 1, 4))  # logical page 3 takes it
    assert cache.physical_page(0, 3) == freed and cache.physical_page(0, 1) == -1
    assert int(cache.block_table[0, 1]) == -1 and cache.pages_in_use() == 3


def test_pages_a_rule_takes_and_maps_itself():
    """take_pages (all or nothing), map_page / unmap_page (the page stays the caller's), and
    map_pages_on_device: appends map nothing on the host, prompts are refused, reserve only
    checks the capacity, and a row the device changed is read back when asked for."""
    cache = KVCache(2, 1, 4, capacity=64, dtype=torch.float32, layout="paged", page_size=8,
                    num_pages=6)
    cache.extend(0, torch.randn(10, 1, 4), torch.randn(10, 1, 4))  # pages 0, 1
    with pytest.raises(CacheFullError, match="5 pages wanted and 4 are free"):
        cache.take_pages(5)
    mine = cache.take_pages(3)
    assert mine == [2, 3, 4] and cache.pages_in_use() == 5
    cache.map_page(1, 0, mine[0])
    assert cache.unmap_page(0, 1) == 1 and cache.pages_in_use() == 5  # not freed
    assert int(cache.block_table[0, 1]) == -1 and int(cache.block_table[1, 0]) == 2
    with pytest.raises(ValueError, match="holds no page"):
        cache.unmap_page(0, 1)
    cache.map_pages_on_device()
    with pytest.raises(ValueError, match="prefill a fresh cache"):
        cache.extend(1, torch.randn(1, 1, 4), torch.randn(1, 1, 4))
    cache.reserve(40)  # maps nothing
    assert cache.pages_in_use() == 5
    with pytest.raises(CacheFullError, match="made for 64"):
        cache.reserve(60)
    cache.block_table[1, 1] = 3  # what a rule's kernel does before the append opening page 1
    cache.lengths[1] = 8
    cache.append(torch.randn(2, 1, 4), torch.randn(2, 1, 4), impl="torch")
    assert cache.physical_page(1, 1) == 3 and cache.physical_page(0, 1) == -1
    assert cache.pages_in_use() == 5 and cache.free_pages == [5]
    with pytest.raises(ValueError, match="contiguous cache has no pages"):
        KVCache(1, 1, 4, capacity=8).take_pages(1)


def test_contiguous_overflow_is_a_clear_error():
    cache = KVCache(1, 1, 4, capacity=8, dtype=torch.float32)
    with pytest.raises(CacheFullError, match="made for 8"):
        cache.extend(0, torch.randn(9, 1, 4), torch.randn(9, 1, 4))


@needs_interp
@pytest.mark.parametrize("layout,heads,dim,new_dtype", [
    ("contiguous", 1, 64, torch.float32), ("contiguous", 8, 128, torch.bfloat16),
    ("paged", 3, 128, torch.float32), ("paged", 8, 64, torch.bfloat16),
    ("contiguous", 2, 40, torch.float16)])
def test_fused_append_matches_torch_append(layout, heads, dim, new_dtype):
    g = torch.Generator().manual_seed(heads * dim)
    caches = {impl: KVCache(4, heads, dim, capacity=96, dtype=torch.bfloat16, layout=layout,
                            page_size=16, num_pages=30) for impl in ("torch", "triton")}
    for b, n in enumerate([0, 15, 16, 33]):  # mixed lengths, page and block boundaries
        k, v = torch.randn(n, heads, dim, generator=g), torch.randn(n, heads, dim, generator=g)
        for cache in caches.values():
            cache.extend(b, k, v)
    if layout == "paged":  # an evicted page in the middle must not be touched or reused early
        for cache in caches.values():
            cache.release_page(3, 1)
    for _ in range(21):
        k = torch.randn(4, heads, dim, generator=g).to(new_dtype)
        v = torch.randn(4, heads, dim, generator=g).to(new_dtype)
        for impl, cache in caches.items():
            cache.append(k, v, impl=impl)
    t, r = caches["triton"], caches["torch"]
    assert torch.equal(t.seq_lens, r.seq_lens) and t.lengths == r.lengths
    if new_dtype == torch.bfloat16:
        assert torch.equal(t.k, r.k) and torch.equal(t.v, r.v)
    else:  # the interpreter's NumPy cast truncates to bf16 (the GPU rounds to nearest even)
        torch.testing.assert_close(t.k, r.k, rtol=2 ** -7, atol=0)
        torch.testing.assert_close(t.v, r.v, rtol=2 ** -7, atol=0)
    if layout == "paged":
        assert torch.equal(t.block_table, r.block_table)


def test_append_rejects_bad_shapes_and_impl():
    cache = KVCache(2, 2, 8, capacity=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="shape"):
        cache.append(torch.randn(2, 2, 8), torch.randn(2, 1, 8))
    with pytest.raises(ValueError, match="impl"):
        cache.append(torch.randn(2, 2, 8), torch.randn(2, 2, 8), impl="cuda")
    assert cache.seq_lens.tolist() == [0, 0] and cache.lengths == [0, 0]


def test_fused_append_compiles_for_sm90():
    for static in (AppendStatic(128, 8, "bf16", "bf16"),
                   AppendStatic(64, 3, "fp16", "fp32", "paged", 16)):
        facts = TritonKVAppend(static).compile_sm90()["kv_append"]
        assert facts["cubin_bytes"] > 0 and facts.get("local", 0) == 0


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)


def test_bad_sizes_and_prefill_shapes_are_named():
    """A cache of a non-positive size, a prefill of another batch, head count or head dim:
    a ValueError that names the problem, and the cache is left as it was."""
    for kw in ({"batch": 0}, {"capacity": -1}, {"kv_heads": 2.0}, {"head_dim": True}):
        args = {"batch": 2, "kv_heads": 2, "head_dim": 8, "capacity": 16, **kw}
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be a positive int"):
            KVCache(**args)
    cache = KVCache(2, 2, 8, capacity=16, dtype=torch.float32)
    good = torch.randn(4, 2, 8)
    for b, k, v, what in ((2, good, good, "outside the cache's batch of 2"),
                          (0, torch.randn(4, 3, 8), torch.randn(4, 3, 8), r"\[n, 2, 8\]"),
                          (0, good, torch.randn(4, 2, 4), r"\[n, 2, 8\]"),
                          (0, torch.randn(2, 4, 2, 8), torch.randn(2, 4, 2, 8), r"\[n, 2, 8\]")):
        with pytest.raises(ValueError, match=what):
            cache.extend(b, k, v)
    assert cache.lengths == [0, 0] and cache.seq_lens.tolist() == [0, 0]
    assert not cache.k.any()


@pytest.mark.parametrize("spec_file", ["seer-attention-r.yaml", "nsa-topk.yaml",
                                       "dash-entmax.yaml", "raas-milestone.yaml"])
def test_a_bad_prefill_leaves_every_rules_cache_as_it_was(spec_file):
    """Each rule's prefill checks the whole batch before writing: a prefill of the wrong
    batch, head count or lengths, or one that overflows, raises and writes nothing."""
    from pathlib import Path

    from sparsegen.methods.decoders import make_cache, make_decoder
    from sparsegen.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[1] / "examples" / "specs" / spec_file)
    m = spec.model
    cache = make_cache(spec, 2, 512, dtype=torch.float32)
    dec = make_decoder(spec, cache)
    extra = ({"k_nope": torch.randn(2, 80, m.num_kv_heads, m.head_dim)}
             if spec.selection.rule == "gate" else {})
    ok = torch.randn(2, 80, m.num_kv_heads, m.head_dim)
    dec.prefill(cache, ok, ok, **extra)
    before = (cache.k.clone(), cache.v.clone(), list(cache.lengths))
    bad = [((torch.randn(3, 80, m.num_kv_heads, m.head_dim),) * 2, {}, "must both be"),
           ((torch.randn(2, 80, m.num_kv_heads + 1, m.head_dim),) * 2, {}, "must both be"),
           ((ok, ok), {"lengths": [80, 81]}, r"lengths \[80, 81\]"),
           ((ok, ok), {"lengths": [80]}, r"must be 2 values"),
           ((torch.randn(2, 500, m.num_kv_heads, m.head_dim),) * 2, {}, "would hold 580")]
    for (k, v), kw, what in bad:
        ex = {"k_nope": k} if extra else {}
        with pytest.raises((ValueError, RuntimeError), match=what):
            dec.prefill(cache, k, v, **ex, **kw)
        assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
        assert cache.lengths == before[2] and cache.seq_lens.tolist() == before[2]


def test_a_paged_prefill_that_would_run_out_of_pages_writes_nothing():
    cache = KVCache(2, 1, 4, capacity=64, dtype=torch.float32, layout="paged", page_size=16,
                    num_pages=5)
    k = torch.randn(2, 40, 1, 4)  # 3 pages each, 6 wanted, 5 free
    with pytest.raises(CacheFullError, match="needs 6 new pages and 5 are free"):
        cache.prefill_lengths(k, k)
    assert cache.prefill_lengths(k, k, lengths=[40, 32]) == [40, 32]  # 3 + 2 pages fit
    with pytest.raises(CacheFullError, match="would hold 65 tokens"):
        cache.prefill_lengths(torch.randn(2, 65, 1, 4), torch.randn(2, 65, 1, 4), [65, 0])
    assert cache.pages_in_use() == 0 and cache.lengths == [0, 0]


def test_reserve_maps_the_pages_of_the_next_appends_all_or_nothing(monkeypatch):
    """reserve(n) maps every page the next n appends write (so a CUDA graph holding those
    steps takes none), and the appends then write what they write without it; a reserve
    the free pages cannot cover maps nothing; an append that would open a page while a
    graph is captured says to reserve (capture simulated: CI has no GPU)."""
    gen = torch.Generator().manual_seed(3)
    caches = [KVCache(3, 2, 8, capacity=64, dtype=torch.float32, layout="paged",
                      page_size=8, num_pages=16) for _ in range(2)]
    k, v = torch.randn(2, 3, 13, 2, 8, generator=gen)
    for c in caches:
        for b, n in enumerate([13, 0, 8]):
            c.extend(b, k[b, :n], v[b, :n])
    free = len(caches[0].free_pages)  # 13
    with pytest.raises(CacheFullError, match="needs 15 new pages and 13 are free"):
        caches[0].reserve(40)
    assert len(caches[0].free_pages) == free and caches[0].lengths == [13, 0, 8]
    caches[0].reserve(11)  # tokens 13-23, 0-10, 8-18: 1 + 2 + 2 new pages
    assert len(caches[0].free_pages) == free - 5
    monkeypatch.setattr(kv_cache, "capturing", lambda t: True)
    for _ in range(11):  # "captured": no page is taken, so none may be needed
        k, v = torch.randn(3, 2, 8, generator=gen), torch.randn(3, 2, 8, generator=gen)
        caches[0].append(k, v, impl="torch")
        monkeypatch.setattr(kv_cache, "capturing", lambda t: False)
        caches[1].append(k, v, impl="torch")
        monkeypatch.setattr(kv_cache, "capturing", lambda t: True)
    assert len(caches[0].free_pages) == free - 5
    for b in range(3):
        assert torch.equal(caches[0].tokens(b)[0], caches[1].tokens(b)[0])
    with pytest.raises(RuntimeError, match=r"sequence 0's next token opens a page.*reserve"):
        caches[0].append(k, v, impl="torch")  # sequence 0 is at 24: page 3 is not mapped
    assert caches[0].lengths == [24, 11, 19]
    contiguous = KVCache(1, 1, 4, capacity=16, dtype=torch.float32)
    contiguous.reserve(16)
    with pytest.raises(CacheFullError, match="made for 16"):
        contiguous.reserve(17)
    with pytest.raises(ValueError, match="token count"):
        contiguous.reserve(-1)


def test_replayed_advances_the_host_counts_over_mapped_pages_only():
    """replayed(steps), after a later replay of a graph of `steps` appends: the host's
    token counts advance by steps where every page those appends wrote is mapped (reserved
    before the replay); otherwise, or past the capacity, it raises and changes nothing."""
    cache = KVCache(2, 1, 4, capacity=32, dtype=torch.float32, layout="paged", page_size=8,
                    num_pages=8)
    cache.extend(0, torch.zeros(5, 1, 4), torch.zeros(5, 1, 4))   # pages 0 | none yet
    with pytest.raises(RuntimeError, match=r"sequence 1's tokens 0-2 .*reserve\(3\)"):
        cache.replayed(3)    # sequence 1 holds no page yet
    assert cache.lengths == [5, 0]
    cache.reserve(3)
    cache.replayed(3)
    assert cache.lengths == [8, 3]
    with pytest.raises(RuntimeError, match=r"sequence 0's tokens 8-8 .*reserve\(1\)"):
        cache.replayed(1)    # token 8 opens page 1, not reserved
    assert cache.lengths == [8, 3]
    with pytest.raises(ValueError, match="step count >= 1"):
        cache.replayed(0)
    full = KVCache(1, 1, 4, capacity=8, dtype=torch.float32)
    full.lengths = [6]
    with pytest.raises(CacheFullError, match="would hold 9 tokens"):
        full.replayed(3)
    full.replayed(2)
    assert full.lengths == [8]


def test_a_cache_of_integers_is_refused():
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        KVCache(1, 1, 8, 16, dtype=torch.int32)
    with pytest.raises(ValueError, match="floating-point torch dtype"):
        KVCache(1, 1, 8, 16, dtype="bf16")
