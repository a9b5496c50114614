"""TileLang block-sparse decode backend.

CPU (always, ~2 minutes on 2 cores): static feasibility (check_config), the rendered source,
and lowering + nvcc compilation for sm_90a of a covering subset of the static matrix (block
16/32/64/128 x head_dim 64/128 x group 1/2/4/8/16 x bf16/fp16 x contiguous/paged: every value
of every axis, every pair of block size / head_dim / dtype / layout) with the default config,
plus 7 non-default configs (cp.async, wgmma tiles, 3 CTAs/SM, 256 threads, ...).
SPARSEGEN_TILELANG_FULL_MATRIX=1 compiles all 160 statics (about 15-25 minutes on 2 cores).

GPU (skipped without CUDA): every output against sparse_decode_reference on random data with
NaN in the cache past each sequence's end: tails that are no multiple of the block, sequences
shorter than a block, one block, all blocks, mixed lengths, empty selections, unsorted
indices with the tail block first, garbage past block_counts, forced split counts (more
splits than blocks), paged caches with shuffled block tables, strided K/V views, sm_scale.
"""
from __future__ import annotations

import itertools
import math
import os

import pytest
import torch

from sparsegen.codegen.backend import CompileError, decode_backend
from sparsegen.codegen.decode_api import DecodeStatic
from sparsegen.codegen.tilelang_decode import (
    MAX_SPLITS, SMEM_LIMIT, TileLangSparseDecode, split_count)
from sparsegen.methods.sparse_decode_ref import (
    dense_decode_reference, sparse_decode_reference)

TL = TileLangSparseDecode
HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"bf16": 2e-2, "fp16": 4e-3}  # max abs error vs the fp32 reference (|out| <~ 1)


def static(bs=64, D=128, G=4, dtype="bf16", layout="contiguous", page_size=None):
    if page_size is None:
        page_size = max(2 * bs, 64) if layout == "paged" else 0
    return DecodeStatic(bs, D, G, dtype, layout, page_size)


def backend(st, **cfg):
    return TL(st, {**TL.default_config(st), **cfg})


# --- static feasibility ---------------------------------------------------------------------

ALL_STATICS = [static(bs, d, g, dt, lay)
               for bs in (16, 32, 64, 128) for d in (64, 128) for g in (1, 2, 4, 8, 16)
               for dt in ("bf16", "fp16") for lay in ("contiguous", "paged")]


def test_default_configs_are_feasible_and_in_space():
    for st in ALL_STATICS:
        cfg = TL.default_config(st)
        assert TL.check_config(st, cfg) is None, (st, cfg)
        space = TL.tunable_space(st)
        assert set(space) == set(cfg)
        for key, val in cfg.items():
            assert val in space[key], (st, key, val, space[key])


def test_check_config_reasons():
    st = static()
    good = TL.default_config(st)
    check = TL.check_config
    assert check(st, good) is None
    assert "layout inference" in check(st, {**good, "threads": 256, "block_h": 64,
                                            "min_blocks_per_sm": 1})
    assert check(st, {**good, "threads": 256, "min_blocks_per_sm": 1}) is None  # P in smem
    assert "registers" in check(st, {**good, "threads": 256})  # 2 x 512 threads
    assert "warps" in check(st, {**good, "threads": 256, "block_n": 32, "min_blocks_per_sm": 1})
    assert check(st, {**good, "num_stages": 4, "min_blocks_per_sm": 1}) is None
    assert "of an SM" in check(st, {**good, "num_stages": 3, "min_blocks_per_sm": 2})
    assert "exceeds the 227 KB of a block" in check(
        static(128, 128, 4), {**good, "block_n": 128, "num_stages": 4, "min_blocks_per_sm": 1})
    assert "block_n" in check(st, {**good, "block_n": 48})
    assert "divide block_size" in check(static(32), {**good, "block_n": 64})
    assert "warps" in check(st, {**good, "block_h": 16, "block_n": 16})
    assert check(static(16), {**good, "block_h": 32, "block_n": 16}) is None
    assert "block_h" in check(st, {**good, "block_h": 8})
    assert "group" in check(DecodeStatic(64, 128, 32), good)
    assert "missing" in check(st, {k: v for k, v in good.items() if k != "waves"})
    assert "unknown" in check(st, {**good, "bogus": 1})
    assert "dtype" in check(DecodeStatic(64, 128, 4, "fp32"), good)
    assert "head_dim" in check(DecodeStatic(64, 96, 4), good)
    with pytest.raises(ValueError):
        TL(st, {**good, "threads": 256, "block_h": 64})


def test_every_space_point_is_feasible_or_has_a_reason():
    for st in (static(), static(16, 64, 1, "fp16", "paged"), static(128, 128, 16)):
        space = TL.tunable_space(st)
        keys = ("block_n", "block_h", "threads", "num_stages", "warp_specialize",
                "min_blocks_per_sm")
        base = TL.default_config(st)
        n_ok = 0
        for combo in itertools.product(*(space[k] for k in keys)):
            cfg = {**base, **dict(zip(keys, combo))}
            r = TL.check_config(st, cfg)
            assert r is None or (isinstance(r, str) and r)
            if r is None:
                n_ok += 1
                assert TL.smem_bytes(st, cfg) <= SMEM_LIMIT
                assert cfg["block_h"] >= st.group_size and st.block_size % cfg["block_n"] == 0
        assert n_ok >= 8, st


def test_split_count_from_shapes():
    for B in (1, 2, 3, 8, 16, 64):
        for Hkv in (1, 2, 8):
            for waves in (1, 2, 3):
                n = split_count(B, Hkv, 4096, 132, waves, 1)
                rows = B * Hkv
                assert 1 <= n <= MAX_SPLITS
                if rows <= waves * 132:  # fills the GPU without spilling into another round
                    assert n * rows <= waves * 132 < (n + 1) * rows or n == MAX_SPLITS
                else:
                    assert n == 1
    assert split_count(1, 8, 5, 132, 2, 2) == 3  # capped by min_blocks_per_split
    assert split_count(1, 8, 0, 132, 2, 2) == 1
    be = backend(static())
    assert be.num_splits(1, 8, 205) == 33       # batch 1 at 128K/90 %: 264 programs
    assert be.num_splits(16, 8, 205) == 2


# --- rendered source ------------------------------------------------------------------------

def test_registry_and_render(tmp_path):
    assert decode_backend("tilelang") is TL
    be = TL(static(64, 128, 4, "bf16", "paged", 256), build_dir=tmp_path)
    path = be.render()
    text = path.read_text()
    assert path.parent == tmp_path and be.render() == path  # content-addressed, stable
    for needle in ("T.exp2(", "T.Pipelined(", "num_stages=NUM_STAGES", "T.dynamic(\"batch\")",
                   "T.dynamic(\"num_splits\")", "T.dynamic(\"max_sel\")", "T.dynamic(\"num_pages\")",
                   "block_table[b, tok0 // PAGE_SIZE]", "tok0 + j < seq_len", "T.gemm(",
                   "PAGE_SIZE = 256", "BLOCK_SIZE = 64", "T.StridedTensor", "T.log2(",
                   "T.reduce_max(", "-T.infinity(accum)"):
        assert needle in text, needle
    assert "T.exp(" not in text  # exp2 only
    assert "seqlen" not in text.split("def build")[1].split("@T.prim_func")[0]  # paged: no S
    cont = TL(static(), {**TL.default_config(static()), "warp_specialize": False},
              build_dir=tmp_path).render().read_text()
    assert 'T.dynamic("seqlen")' in cont and "T.StridedTensor" not in cont
    assert "TL_DISABLE_WARP_SPECIALIZED" in cont
    # fp16 and small tiles: P goes through shared memory
    small = TL(static(dtype="fp16"), {**TL.default_config(static()), "block_h": 16},
               build_dir=tmp_path).render().read_text()
    assert "T.float16" in small and "P_shared" in small and "acc_s_cast" not in small


# --- compile for sm_90a with no GPU -----------------------------------------------------------

def _covering_statics():
    """8 statics: every value of every axis; every pair of values of block size, head_dim,
    dtype and layout; each block size with both head dims, dtypes and layouts."""
    rows = [(16, 64, 1, "bf16", "contiguous"), (16, 128, 16, "fp16", "paged"),
            (32, 128, 2, "bf16", "paged"), (32, 64, 8, "fp16", "contiguous"),
            (64, 128, 4, "bf16", "contiguous"), (64, 64, 16, "fp16", "paged"),
            (128, 64, 4, "bf16", "paged"), (128, 128, 8, "fp16", "contiguous")]
    return [static(*r) for r in rows]


COMPILE_STATICS = ALL_STATICS if os.environ.get("SPARSEGEN_TILELANG_FULL_MATRIX") else \
    _covering_statics()


def test_covering_subset_covers_every_value_and_pair():
    axes = lambda s: (s.block_size, s.head_dim, s.group_size, s.dtype, s.layout)  # noqa: E731
    rows = [axes(s) for s in _covering_statics()]
    full = [axes(s) for s in ALL_STATICS]
    for a in range(5):
        assert {r[a] for r in rows} == {r[a] for r in full}, a
    for a, b in itertools.combinations((0, 1, 3, 4), 2):
        assert {(r[a], r[b]) for r in rows} == {(r[a], r[b]) for r in full}, (a, b)


def _compile(st, cfg, tmp_path):
    be = TL(st, cfg, build_dir=tmp_path)
    facts = be.compile_sm90()
    names = facts["kernel_names"]
    assert names == ["sparse_decode_kernel", "sparse_decode_kernel_1"], names  # attn, merge
    assert facts["cubin_bytes"] > 0 and facts["cuda_source_chars"] > 0
    res = facts.get("resources", {}).get("sparse_decode_kernel")
    if res:
        assert res["local"] == 0, f"register spills: {res}"
        # check_config's shared-memory model is the compiler's own figure
        used = facts["dynamic_smem"]["sparse_decode_kernel"] + res["static_smem"]
        assert used <= facts["smem_estimate"] <= used + 2048, (used, facts["smem_estimate"])
    return be, facts


@pytest.mark.parametrize("st", COMPILE_STATICS,
                         ids=[f"bs{s.block_size}-D{s.head_dim}-G{s.group_size}-{s.dtype}-{s.layout}"
                              for s in COMPILE_STATICS])
def test_compile_sm90_default(st, tmp_path):
    be, facts = _compile(st, TL.default_config(st), tmp_path)
    assert facts["uses_tma"] and not facts["uses_cp_async"]  # TMA producer warpgroup
    assert facts["smem_estimate"] <= SMEM_LIMIT


CONFIGS = [  # (static, config overrides): the other code paths of the template
    (static(64, 128, 4), dict(warp_specialize=False, block_h=64)),         # cp.async + wgmma
    (static(64, 128, 4, "fp16", "paged", 128), dict(block_h=16)),  # P through shared memory
    (static(64, 128, 4), dict(block_h=64)),                                 # wgmma, P in registers
    (static(128, 64, 8), dict(block_n=32, block_h=32, num_stages=3, min_blocks_per_sm=1)),
    (static(64, 128, 16), dict(block_h=64, num_stages=4, min_blocks_per_sm=1, merge_chunk=8)),
    (static(64, 128, 4), dict(block_h=16, block_n=32, num_stages=3, min_blocks_per_sm=3)),
    (static(64, 128, 8, "fp16", "paged", 64), dict(threads=256, min_blocks_per_sm=1)),
]


@pytest.mark.parametrize("st,over", CONFIGS, ids=[f"{i}" for i in range(len(CONFIGS))])
def test_compile_sm90_configs(st, over, tmp_path):
    cfg = {**TL.default_config(st), **over}
    assert TL.check_config(st, cfg) is None
    be, facts = _compile(st, cfg, tmp_path)
    if cfg["warp_specialize"]:
        assert facts["uses_tma"]
    else:
        assert facts["uses_cp_async"] and not facts["uses_tma"]
    if cfg["block_h"] == 64:
        assert facts["uses_wgmma"]


def test_threads_256_really_fails_layout_inference(tmp_path):
    """The reason check_config gives for threads=256 with a 64-row tile (P kept in
    registers) is TileLang's own verdict; smaller tiles put P in shared memory and compile."""
    st = static()
    be = TL.__new__(TL)
    be.static, be.build_dir = st, tmp_path
    be.config = {**TL.default_config(st), "threads": 256, "block_h": 64, "min_blocks_per_sm": 1}
    with pytest.raises(CompileError, match="[Ll]ayout"):
        be.compile_sm90()


# --- on a GPU against the reference ---------------------------------------------------------

def make_case(st, B, Hkv, seq_lens, sel=None, *, seed=0, q_scale=1.0, counts=None,
              device="cuda"):
    """Random inputs with NaN in the cache past each sequence's end (also in unused pages).
    `sel(b, h, n_blocks, gen)` gives the selected block ids in the order handed over
    (default: a random non-empty subset in random order); garbage follows the count."""
    gen = torch.Generator().manual_seed(seed)
    bs, D, G, dt = st.block_size, st.head_dim, st.group_size, DT[st.dtype]
    S_alloc = max(seq_lens) + 5  # no multiple of the block: TMA/cp.async bounds matter
    q = (torch.randn(B, Hkv * G, D, generator=gen) * q_scale).to(dt)
    k = torch.randn(B, S_alloc, Hkv, D, generator=gen).to(dt)
    v = torch.randn(B, S_alloc, Hkv, D, generator=gen).to(dt)
    for b, n in enumerate(seq_lens):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    chosen = []
    for b in range(B):
        nb = math.ceil(seq_lens[b] / bs)
        row = []
        for h in range(Hkv):
            if sel is None:
                c = int(torch.randint(1, nb + 1, (1,), generator=gen))
                ids = torch.randperm(nb, generator=gen)[:c]
            else:
                ids = torch.as_tensor(sel(b, h, nb, gen), dtype=torch.long)
            row.append(ids)
        chosen.append(row)
    max_sel = max(1, max(len(i) for r in chosen for i in r))
    idx = torch.randint(10**6, 10**8, (B, Hkv, max_sel), generator=gen, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            idx[b, h, :len(chosen[b][h])] = chosen[b][h].to(torch.int32)
            cnt[b, h] = len(chosen[b][h])
    if counts is not None:
        cnt = counts(cnt)
    case = dict(q=q, k=k, v=v, block_indices=idx, block_counts=cnt,
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_table=None)
    if st.layout == "paged":
        ps = st.page_size
        per_seq = math.ceil(S_alloc / ps)
        n_pages = B * per_seq + 3
        perm = torch.randperm(n_pages, generator=gen)
        kp = torch.full((n_pages, ps, Hkv, D), float("nan"), dtype=dt)
        vp = torch.full_like(kp, float("nan"))
        table = torch.full((B, per_seq), 10**7, dtype=torch.int32)  # never read
        for b in range(B):
            for p in range(math.ceil(seq_lens[b] / ps)):
                page = int(perm[b * per_seq + p])
                table[b, p] = page
                lo, hi = p * ps, min((p + 1) * ps, S_alloc)
                kp[page, :hi - lo] = k[b, lo:hi]
                vp[page, :hi - lo] = v[b, lo:hi]
        case.update(k=kp, v=vp, block_table=table)
    return {n: (t.to(device) if t is not None else None) for n, t in case.items()}


def reference(st, case, sm_scale=None):
    return sparse_decode_reference(case["q"], case["k"], case["v"], case["block_indices"],
                                   case["block_counts"], case["seq_lens"], st.block_size,
                                   block_table=case["block_table"], sm_scale=sm_scale)


def run(be, case, **kw):
    return be(case["q"], case["k"], case["v"], case["block_indices"], case["block_counts"],
              case["seq_lens"], block_table=case["block_table"], **kw)


def assert_close(out, ref, dtype, what=""):
    assert out.shape == ref.shape and out.dtype == DT[dtype]
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs err {err:.3g} {what}"


GPU_CASES = [  # (static, config overrides, seq_lens)
    (static(64, 128, 4, "bf16"), {}, [1000, 37, 64, 321]),
    (static(64, 128, 4, "fp16"), {}, [1000, 37, 64, 321]),
    (static(64, 128, 4, "bf16", "paged", 128), {}, [700, 63, 129]),
    (static(64, 128, 4, "fp16", "paged", 64), {}, [700, 63, 129]),
    (static(64, 128, 4), dict(warp_specialize=False), [1000, 37, 64]),
    (static(64, 128, 4), dict(block_h=64), [1000, 37, 64]),
    (static(64, 128, 4), dict(block_n=32, num_stages=3, min_blocks_per_sm=3), [1000, 37, 64]),
    (static(16, 64, 16, "fp16"), dict(block_n=16), [200, 9, 16]),
    (static(32, 128, 8, "bf16", "paged", 64), dict(block_n=32), [300, 31, 32]),
    (static(128, 64, 2, "fp16"), dict(block_n=64, block_h=32, min_blocks_per_sm=1), [500, 100, 128]),
    (static(128, 128, 1, "bf16", "paged", 256), dict(block_n=32), [600, 127]),
]


@needs_cuda
@pytest.mark.parametrize("st,over,seqs", GPU_CASES, ids=[f"{i}" for i in range(len(GPU_CASES))])
def test_matches_reference(st, over, seqs):
    be = backend(st, **over)
    case = make_case(st, len(seqs), 2, seqs, seed=st.block_size + st.group_size)
    case["block_counts"][0, 1] = 0  # one head selects nothing
    ref = reference(st, case)
    G = st.group_size
    for ns in (None, 1, 3, 64):
        out = run(be, case, num_splits=ns)
        assert_close(out, ref, st.dtype, f"num_splits={ns}")
        assert out[0, G:2 * G].abs().max() == 0  # empty head: exact zeros


@needs_cuda
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_all_blocks_selected_equals_dense(layout):
    st = static(32, 128, 4, "fp16", layout, 64)
    be = backend(st, block_n=32)
    case = make_case(st, 3, 2, [250, 64, 3], seed=3,
                     sel=lambda b, h, n, gen: torch.randperm(n, generator=gen))
    out = run(be, case)
    assert_close(out, reference(st, case), "fp16")
    if layout == "contiguous":
        dense = dense_decode_reference(case["q"], case["k"], case["v"], case["seq_lens"])
        assert_close(out, dense, "fp16", "vs dense")


@needs_cuda
def test_one_block_tail_first_unsorted_and_sm_scale():
    st = static(64, 128, 8, "fp16")
    be = backend(st)

    def sel(b, h, n, gen):  # tail block first, then descending, or only block 0
        return [n - 1] + list(range(n - 2, -1, -1)) if h == 0 else [0]

    case = make_case(st, 2, 2, [200, 70], sel=sel, seed=5)
    for scale in (None, 0.3):
        for ns in (1, 2, 4):
            assert_close(run(be, case, sm_scale=scale, num_splits=ns),
                         reference(st, case, sm_scale=scale), "fp16", f"{scale} {ns}")


@needs_cuda
def test_empty_selection_and_empty_splits():
    st = static(64, 128, 4, "fp16")
    be = backend(st)
    case = make_case(st, 2, 2, [300, 90], counts=lambda c: torch.zeros_like(c))
    out, o_part, lse = be.partials(case["q"], case["k"], case["v"], case["block_indices"],
                                   case["block_counts"], case["seq_lens"], num_splits=5)
    assert torch.equal(out, torch.zeros_like(out))
    assert torch.isneginf(lse).all() and torch.equal(o_part, torch.zeros_like(o_part))
    # more splits than blocks, scores near 0: an lse = 0 marker would dilute the output
    case = make_case(st, 2, 2, [96, 40], q_scale=1e-3, seed=11,
                     sel=lambda b, h, n, gen: [n - 1] if b else [0, 1])
    out, o_part, lse = be.partials(case["q"], case["k"], case["v"], case["block_indices"],
                                   case["block_counts"], case["seq_lens"], num_splits=7)
    assert_close(out, reference(st, case), "fp16")
    assert torch.isneginf(lse[1, :, 1:]).all() and torch.isfinite(lse[1, :, 0]).all()


@needs_cuda
def test_strided_views_and_graph_capture():
    st = static(64, 128, 4, "bf16")
    be = backend(st)
    case = make_case(st, 3, 2, [500, 64, 130], seed=9)
    ref = reference(st, case)
    case["k"] = case["k"].transpose(1, 2).contiguous().transpose(1, 2)  # head-major storage
    case["v"] = case["v"].transpose(1, 2).contiguous().transpose(1, 2)
    assert not case["k"].is_contiguous()
    assert_close(run(be, case), ref, "bf16", "strided")
    graph = torch.cuda.CUDAGraph()
    run(be, case)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out = run(be, case)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, ref, "bf16", "graph replay")


@needs_cuda
def test_rejects_bad_inputs():
    st = static(64, 64, 4, "fp16")
    be = backend(st)
    case = make_case(st, 1, 2, [100])
    with pytest.raises(TypeError):
        run(be, {**case, "q": case["q"].float()})
    with pytest.raises(TypeError):
        run(be, {**case, "block_indices": case["block_indices"].long()})
    with pytest.raises(ValueError):
        run(be, {**case, "q": case["q"][:, :6]})
    with pytest.raises(TypeError):
        run(backend(static(64, 64, 4, "fp16", "paged", 128)), case)  # no block table
