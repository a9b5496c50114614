"""Triton block-sparse decode backend: runs in Triton's interpreter on the CPU against the
plain-torch reference, and compiles for sm_90 with no GPU.

TRITON_INTERPRET must be set before triton is first imported (triton 3.6 decides at import
whether its own standard library is interpreted, and cannot mix the two modes in one
process); setdefault keeps a caller's choice. If another test module imported triton first,
the interpreter tests skip here and test_interpreter_tests_in_subprocess runs them in a fresh
process. compile_sm90 works in either mode. (bf16 is compile-only here: tl.dot on bf16 is
wrong in the interpreter.)
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402

from sparsegen.codegen.backend import CompileError, decode_backend  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.codegen.triton_decode import (  # noqa: E402
    SMEM_LIMIT, TritonSparseDecode, split_count)
from sparsegen.methods.sparse_decode_ref import (  # noqa: E402
    dense_decode_reference, sparse_decode_reference)

INTERPRETED = type(tl.cdiv).__name__ == "InterpretedFunction"  # triton in interpreter mode
needs_interp = pytest.mark.skipif(
    not INTERPRETED, reason="triton was imported without TRITON_INTERPRET=1 in this process; "
    "test_interpreter_tests_in_subprocess runs these")
DT = {"fp16": torch.float16, "fp32": torch.float32}
TOL = {"fp16": 2e-2, "fp32": 1e-4}  # max abs error vs the fp32 reference (|out| <~ 1)


def make_case(B, Hkv, G, D, bs, seq_lens, dtype, *, layout="contiguous", page_size=0,
              sel=None, counts=None, poison=True, seed=0, q_scale=1.0):
    """Random q/k/v plus a selection. `sel(b, h, n_blocks, gen)` returns the selected block
    ids of one (batch, KV head) in the order to hand over (default: a random subset in random
    order). Tokens past seq_len hold NaN (poison), so a kernel that reads them unmasked fails."""
    gen = torch.Generator().manual_seed(seed)
    dt = DT[dtype]
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    S = max(seq_lens)
    S_alloc = ((S + bs - 1) // bs) * bs + bs  # room past the last block, also poisoned
    q = (torch.randn(B, Hkv * G, D, generator=gen) * q_scale).to(dt)
    k = torch.randn(B, S_alloc, Hkv, D, generator=gen).to(dt)
    v = torch.randn(B, S_alloc, Hkv, D, generator=gen).to(dt)
    if poison:
        for b in range(B):
            k[b, seq_lens[b]:] = float("nan")
            v[b, seq_lens[b]:] = float("nan")
    n_blocks = [(n + bs - 1) // bs for n in seq_lens]
    chosen = [[None] * Hkv for _ in range(B)]
    for b in range(B):
        for h in range(Hkv):
            if sel is None:
                c = int(torch.randint(1, n_blocks[b] + 1, (1,), generator=gen))
                ids = torch.randperm(n_blocks[b], generator=gen)[:c]
            else:
                ids = torch.as_tensor(sel(b, h, n_blocks[b], gen), dtype=torch.long)
            chosen[b][h] = ids
    max_sel = max(1, max(len(c) for row in chosen for c in row))
    idx = torch.full((B, Hkv, max_sel), -7, dtype=torch.int32)  # garbage past the count
    cnt = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            ids = chosen[b][h]
            idx[b, h, :len(ids)] = ids.to(torch.int32)
            cnt[b, h] = len(ids)
    if counts is not None:
        cnt = counts(cnt)
    case = dict(q=q, k=k, v=v, block_indices=idx, block_counts=cnt, seq_lens=seq)
    if layout == "paged":
        case.update(to_paged(k, v, seq_lens, page_size, gen))
    return case


def to_paged(k, v, seq_lens, page_size, gen):
    """Scatter contiguous k/v into a shuffled page pool with a non-identity block table."""
    B, S, Hkv, D = k.shape
    max_pages = (S + page_size - 1) // page_size
    n_pages = B * max_pages + 3
    perm = torch.randperm(n_pages, generator=gen)
    kp = torch.full((n_pages, page_size, Hkv, D), float("nan"), dtype=k.dtype)
    vp = torch.full_like(kp, float("nan"))
    table = torch.full((B, max_pages), 10**6, dtype=torch.int32)  # never read
    for b in range(B):
        for p in range((seq_lens[b] + page_size - 1) // page_size):
            page = int(perm[b * max_pages + p])
            table[b, p] = page
            lo, hi = p * page_size, min((p + 1) * page_size, S)
            kp[page, :hi - lo] = k[b, lo:hi]
            vp[page, :hi - lo] = v[b, lo:hi]
    return dict(k=kp, v=vp, block_table=table)


def reference(case, bs, sm_scale=None):
    return sparse_decode_reference(case["q"], case["k"], case["v"], case["block_indices"],
                                   case["block_counts"], case["seq_lens"], bs,
                                   block_table=case.get("block_table"), sm_scale=sm_scale)


def run(be, case, **kw):
    return be(case["q"], case["k"], case["v"], case["block_indices"], case["block_counts"],
              case["seq_lens"], block_table=case.get("block_table"), **kw)


def backend(bs, D, G, dtype, layout="contiguous", page_size=0, **cfg):
    st = DecodeStatic(bs, D, G, dtype, layout, page_size)
    return TritonSparseDecode(st, {**TritonSparseDecode.default_config(st), **cfg})


def assert_close(out, ref, dtype, what=""):
    assert out.shape == ref.shape
    assert out.dtype == DT[dtype]
    assert torch.isfinite(out).all(), f"non-finite output {what}"
    err = (out.float() - ref).abs().max().item()
    assert err < TOL[dtype], f"max abs err {err:.3g} {what}"


# --- against the reference in the interpreter --------------------------------------------

# (block_size, head_dim, group, dtype, layout, page_size, block_n, seq_lens)
CASES = [
    (16, 64, 4, "fp16", "contiguous", 0, 64, [77, 5, 130]),      # gathered tiles, short seq
    (16, 64, 1, "fp32", "paged", 32, 32, [100, 16]),             # gathered + paged
    (32, 64, 2, "fp16", "contiguous", 0, 32, [200, 31, 64]),
    (32, 128, 8, "fp32", "paged", 64, 16, [150, 33]),            # 2 sub-tiles per block
    (64, 128, 4, "fp16", "contiguous", 0, 64, [300, 64, 17]),    # the H100 target shape
    (64, 64, 16, "fp16", "paged", 128, 64, [260, 190]),
    (64, 64, 2, "fp32", "contiguous", 0, 128, [257, 129]),       # 2 blocks per tile
    (128, 64, 8, "fp16", "paged", 256, 32, [300, 129]),          # 4 sub-tiles per block
    (128, 128, 1, "fp16", "contiguous", 0, 64, [383, 100]),
]


@needs_interp
@pytest.mark.parametrize("bs,D,G,dtype,layout,ps,bn,seqs", CASES,
                         ids=[f"bs{c[0]}-D{c[1]}-G{c[2]}-{c[3]}-{c[4]}-bn{c[6]}" for c in CASES])
def test_matches_reference(bs, D, G, dtype, layout, ps, bn, seqs):
    """Random subsets in random order, mixed lengths (not multiples of the block, one shorter
    than a block), one head with nothing selected; default and forced split counts."""
    be = backend(bs, D, G, dtype, layout, ps, block_n=bn, num_warps=2 if bn == 16 else 4)
    case = make_case(len(seqs), 2, G, D, bs, seqs, dtype, layout=layout, page_size=ps,
                     seed=bs + D + G)
    case["block_counts"][0, 1] = 0
    ref = reference(case, bs)
    assert ref[0, G:2 * G].abs().max() == 0
    for ns in (None, 1, 3):
        out = run(be, case, num_splits=ns)
        assert_close(out, ref, dtype, f"num_splits={ns}")
        assert out[0, G:2 * G].abs().max() == 0  # empty head: exact zeros


@needs_interp
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_all_blocks_selected_equals_dense(layout):
    seqs = [250, 64, 3]
    bs, D, G = 32, 64, 4
    be = backend(bs, D, G, "fp32", layout, 64 if layout == "paged" else 0)
    case = make_case(3, 2, G, D, bs, seqs, "fp32", layout=layout, page_size=64, seed=3,
                     sel=lambda b, h, n, gen: torch.randperm(n, generator=gen))
    out = run(be, case)
    ref = reference(case, bs)
    assert_close(out, ref, "fp32")
    if layout == "contiguous":
        dense = dense_decode_reference(case["q"], case["k"], case["v"], case["seq_lens"])
        assert_close(out, dense, "fp32", "vs dense")


@needs_interp
def test_one_selected_block_and_sm_scale():
    bs, D, G = 64, 128, 8
    be = backend(bs, D, G, "fp16")
    # the last block, partly filled, for one head; block 0 for the other
    case = make_case(2, 2, G, D, bs, [200, 70], "fp16", seed=5,
                     sel=lambda b, h, n, gen: [n - 1] if h == 0 else [0])
    for scale in (None, 0.3):
        assert_close(run(be, case, sm_scale=scale), reference(case, bs, sm_scale=scale), "fp16")


@needs_interp
def test_unsorted_indices_and_tail_block_first():
    """The partly filled last block comes first and in the middle: the tail mask must come
    from the token positions, not from the order of the indices."""
    bs, D, G = 32, 64, 2
    be = backend(bs, D, G, "fp32")
    seqs = [101, 70]

    def sel(b, h, n, gen):
        ids = [n - 1] + [i for i in range(n - 2, -1, -1)]
        return ids if h == 0 else ids[1:2] + [n - 1] + ids[2:]

    case = make_case(2, 2, G, D, bs, seqs, "fp32", sel=sel, seed=7)
    for ns in (1, 2, 4):
        assert_close(run(be, case, num_splits=ns), reference(case, bs), "fp32")


@needs_interp
@pytest.mark.parametrize("layout", ["contiguous", "paged"])
def test_empty_selection_gives_zeros(layout):
    bs, D, G = 16, 64, 4
    be = backend(bs, D, G, "fp16", layout, 16 if layout == "paged" else 0, block_n=32,
                 num_warps=2)
    case = make_case(2, 2, G, D, bs, [40, 9], "fp16", layout=layout, page_size=16,
                     counts=lambda c: torch.zeros_like(c))
    for ns in (1, 5):
        out, o_part, lse = be.partials(case["q"], case["k"], case["v"], case["block_indices"],
                                       case["block_counts"], case["seq_lens"],
                                       block_table=case.get("block_table"), num_splits=ns)
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()       # never 0: an empty split must not count
        assert torch.equal(o_part, torch.zeros_like(o_part))


@needs_interp
def test_empty_splits_do_not_dilute():
    """More splits than selected blocks: the empty splits write lse=-inf and drop out of the
    merge. Scores near 0 (tiny q) would make an lse=0 marker visibly wrong."""
    bs, D, G = 32, 64, 4
    be = backend(bs, D, G, "fp32")
    case = make_case(2, 2, G, D, bs, [96, 40], "fp32", q_scale=1e-3, seed=11,
                     sel=lambda b, h, n, gen: [n - 1] if b else [0, 2])
    out, o_part, lse = be.partials(case["q"], case["k"], case["v"], case["block_indices"],
                                   case["block_counts"], case["seq_lens"], num_splits=7)
    assert_close(out, reference(case, bs), "fp32")
    assert torch.isneginf(lse[1, :, 1:]).all() and torch.isfinite(lse[1, :, 0]).all()
    assert torch.equal(o_part[1, :, 1:], torch.zeros_like(o_part[1, :, 1:]))


@needs_interp
def test_group_sizes_and_strided_views():
    """GQA groups 1/2/4/8/16; k/v as a head-major cache viewed as [B, S, Hkv, D], q a view."""
    bs, D = 32, 64
    for G in (1, 2, 4, 8, 16):
        be = backend(bs, D, G, "fp16")
        case = make_case(2, 2, G, D, bs, [90, 33], "fp16", seed=G)
        ref = reference(case, bs)
        # head-major copies [B, Hkv, S, D] seen through transposes; q inside a wider buffer
        case["k"] = case["k"].transpose(1, 2).contiguous().transpose(1, 2)
        case["v"] = case["v"].transpose(1, 2).contiguous().transpose(1, 2)
        wide = torch.zeros(2, 2 * G, 3 * D, dtype=torch.float16)
        wide[:, :, D:2 * D] = case["q"]
        case["q"] = wide[:, :, D:2 * D]
        assert case["k"].stride(1) == D and not case["q"].is_contiguous()
        assert_close(run(be, case), ref, "fp16", f"G={G}")


@needs_interp
def test_paged_page_equals_block_and_shared_selection_widths():
    """page_size == block_size (every block its own page), KV heads with different counts
    and a wider block_indices than any count."""
    bs, D, G = 16, 128, 4
    be = backend(bs, D, G, "fp32", "paged", 16, block_n=16, num_warps=2)
    case = make_case(2, 3, G, D, bs, [70, 45], "fp32", layout="paged", page_size=16, seed=13)
    wide = torch.full((2, 3, 9), 123, dtype=torch.int32)
    wide[:, :, :case["block_indices"].shape[2]] = case["block_indices"]
    case["block_indices"] = wide
    assert_close(run(be, case), reference(case, bs), "fp32")


@needs_interp
def test_rejects_bad_inputs():
    be = backend(64, 64, 4, "fp16")
    case = make_case(1, 2, 4, 64, 64, [100], "fp16")
    with pytest.raises(TypeError):
        run(be, {**case, "q": case["q"].float()})
    with pytest.raises(TypeError):
        run(be, {**case, "block_indices": case["block_indices"].long()})
    with pytest.raises(ValueError):
        run(be, {**case, "q": case["q"][:, :6]})
    pbe = backend(64, 64, 4, "fp16", "paged", 128)
    with pytest.raises(TypeError):
        run(pbe, case)  # no block table


@pytest.mark.skipif(INTERPRETED, reason="the interpreter tests ran in this process")
def test_interpreter_tests_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           __file__, "-k", "not compile and not subprocess"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]


# --- shapes-only split heuristic ---------------------------------------------------------

def test_split_count_fills_without_spilling_a_round():
    for B in (1, 2, 3, 5, 8, 16, 64):
        for Hkv in (1, 2, 8):
            for waves in (1, 2, 3):
                n = split_count(B, Hkv, 4096, 132, waves, 1)
                rows = B * Hkv
                assert 1 <= n <= 256
                if rows <= waves * 132:
                    assert n * rows <= waves * 132 < (n + 1) * rows or n == 256
                else:
                    assert n == 1
    assert split_count(1, 8, 5, 132, 3, 2) == 3      # capped by min_blocks_per_split
    assert split_count(1, 8, 0, 132, 3, 2) == 1
    be = backend(64, 128, 4, "fp16")
    assert be.num_splits(1, 8, 2048) * 8 >= 0.9 * 132  # batch 1 still fills 132 SMs
    assert be.num_splits(16, 8, 205) * 16 * 8 <= 132 * be.config["waves"]


# --- static feasibility ------------------------------------------------------------------

STATICS = [DecodeStatic(bs, d, g, dt, lay, 256 if lay == "paged" else 0)
           for bs in (16, 32, 64, 128) for d in (64, 128) for g in (1, 4, 16)
           for dt in ("bf16", "fp16") for lay in ("contiguous", "paged")]


def test_default_configs_are_feasible():
    for st in STATICS:
        cfg = TritonSparseDecode.default_config(st)
        assert TritonSparseDecode.check_config(st, cfg) is None, (st, cfg)
        space = TritonSparseDecode.tunable_space(st)
        for key, val in cfg.items():
            if key in space:
                assert val in space[key], (key, val, space[key])


def test_check_config_reasons():
    st = DecodeStatic(64, 128, 4, "bf16")
    good = TritonSparseDecode.default_config(st)
    check = TritonSparseDecode.check_config
    assert check(st, good) is None
    assert "block_n" in check(st, {**good, "block_n": 48})
    assert "shared memory" in check(st, {**good, "block_n": 128, "num_stages": 5})
    assert "missing" in check(st, {k: v for k, v in good.items() if k != "waves"})
    assert "unknown" in check(st, {**good, "bogus": 1})
    assert "num_warps" in check(st, {**good, "num_warps": 3})
    st16 = DecodeStatic(128, 128, 4, "bf16")
    assert "neither divides" not in (check(st16, {**good, "block_n": 32}) or "")
    with pytest.raises(ValueError):
        TritonSparseDecode(st, {**good, "block_n": 48})
    # every point of the space is either feasible or comes with a reason
    space = TritonSparseDecode.tunable_space(st)
    n_ok = 0
    for n in space["block_n"]:
        for w in space["num_warps"]:
            for s in space["num_stages"]:
                r = check(st, {**good, "block_n": n, "num_warps": w, "num_stages": s})
                assert r is None or isinstance(r, str) and r
                n_ok += r is None
                if r is None:
                    assert TritonSparseDecode.smem_bytes(
                        st, {**good, "block_n": n, "num_stages": s}) <= SMEM_LIMIT
    assert n_ok > 10


def test_registry_and_render():
    assert decode_backend("triton") is TritonSparseDecode
    be = backend(64, 128, 4, "bf16", "paged", 256)
    text = be.render().read_text()
    assert "BLOCK_SIZE = tl.constexpr(64)" in text and "PAGE_SIZE = tl.constexpr(256)" in text
    assert "inline_asm_elementwise" in text  # the GPU variant
    assert be.render() == be.render()
    assert "inline_asm_elementwise" not in be.render(interpret=True).read_text()


# --- compile for sm_90 with no GPU -------------------------------------------------------

COMPILE = [  # (block_size, head_dim, group, dtype, layout) covering each value of each axis
    (64, 128, 4, "bf16", "contiguous"), (64, 128, 4, "bf16", "paged"),
    (16, 128, 8, "bf16", "contiguous"), (16, 64, 1, "fp16", "paged"),
    (32, 64, 16, "bf16", "contiguous"), (32, 128, 4, "fp16", "paged"),
    (128, 128, 16, "fp16", "contiguous"), (128, 64, 8, "bf16", "paged"),
    (64, 64, 1, "fp16", "contiguous"), (128, 128, 1, "bf16", "paged"),
]


@pytest.mark.parametrize("bs,D,G,dtype,layout", COMPILE,
                         ids=[f"bs{c[0]}-D{c[1]}-G{c[2]}-{c[3]}-{c[4]}" for c in COMPILE])
def test_compile_sm90(bs, D, G, dtype, layout, tmp_path):
    st = DecodeStatic(bs, D, G, dtype, layout, 256 if layout == "paged" else 0)
    be = TritonSparseDecode(st, build_dir=tmp_path)
    facts = be.compile_sm90(keep_asm=True)
    split, merge = facts["sparse_decode_split"], facts["sparse_decode_merge"]
    assert split["cubin_bytes"] > 0 and merge["cubin_bytes"] > 0
    # the shared-memory model used by check_config is the compiler's own figure here
    assert split["shared"] == TritonSparseDecode.smem_bytes(st, be.config) <= SMEM_LIMIT
    if "n_regs" in split:
        assert split["n_regs"] <= 255 and split["local"] == 0, split  # no spills
    # K/V streamed by cp.async with num_stages - 1 tiles in flight, loads 16 bytes wide
    ttgir, ptx = split["asm"]["ttgir"], split["asm"]["ptx"]
    ahead, n, d = be.config["num_stages"] - 1, be.config["block_n"], D
    assert ttgir.count(f"!ttg.memdesc<{ahead}x{n}x{d}x") >= 2, "K/V not multi-buffered"
    assert f"async_wait" in ttgir and f"{{num = {2 * (ahead - 1)} : i32}}" in ttgir, "not pipelined"
    assert "cp.async.cg.shared.global" in ptx and ", 0x10" in ptx
    assert "mma.sync" in ptx


def test_compile_sm90_pdl(tmp_path):
    """pdl=1: the merge waits on the split kernel (griddepcontrol) and is launched with PDL."""
    st = DecodeStatic(64, 128, 4, "bf16", "paged", 256)
    be = TritonSparseDecode(st, {**TritonSparseDecode.default_config(st), "pdl": 1},
                            build_dir=tmp_path)
    assert be._kw_merge.get("launch_pdl") is True
    facts = be.compile_sm90(keep_asm=True)
    assert "griddepcontrol.wait" in facts["sparse_decode_merge"]["asm"]["ptx"]
    assert "griddepcontrol.launch_dependents" in facts["sparse_decode_split"]["asm"]["ptx"]
    assert "gdc_wait" not in be.render(interpret=True).read_text()


def test_compile_error_is_reported(tmp_path):
    be = backend(64, 64, 4, "fp16")
    be.build_dir = tmp_path
    be._kw_split = {**be._kw_split, "num_warps": 3}  # not a power of two: Triton refuses
    with pytest.raises(CompileError):
        be.compile_sm90()


def test_default_occupancy_targets():
    st = DecodeStatic(64, 128, 4, "bf16")
    cfg = TritonSparseDecode.default_config(st)
    # H100 target: 96 KB of K/V in flight per program, room for two programs per SM
    assert (cfg["num_stages"] - 1) * 2 * cfg["block_n"] * 128 * 2 == 96 * 1024
    assert TritonSparseDecode.occupancy(st, cfg) == 2 >= cfg["waves"]
    assert math.isclose(TritonSparseDecode.smem_bytes(st, cfg) / 1024, 102.0)
    assert "pdl" in TritonSparseDecode.check_config(st, {**cfg, "pdl": 2})
    cfg.pop("pdl")  # optional key (configs stored before it existed stay valid)
    assert TritonSparseDecode.check_config(st, cfg) is None
