"""TileLang sparse-decode smoke test on a GPU: correctness first, then timing.

    source .gpu/prelude.sh && python3 bench/tilelang_smoke.py [--quick] [--json OUT.json]

1. correctness vs sparse_decode_reference (fp32) for bf16 and fp16, contiguous and paged,
   on edge cases (tail blocks, short/one-block/all-block sequences, mixed lengths, empty
   selections, unsorted indices, garbage past block_counts, NaN in the cache past seq_len,
   forced split counts, strided K/V views);
2. timing of the target shape (Hq 32 / Hkv 8 / D 128 / block 64, bf16, 90 % sparsity, S=128K)
   at batch 1, 8, 16 for a few configs: triton.testing.do_bench median of a plain call and
   CUDA-graph replay, rotating over index sets so that no set stays in L2; bandwidth over
   the selected KV bytes; dense torch SDPA and a device copy as baselines.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.timing import require_cuda  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.codegen.tilelang_decode import TileLangSparseDecode  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402

DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {"bf16": 2e-2, "fp16": 4e-3}
RESULTS: dict = {"correctness": [], "timing": [], "errors": []}


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
def make_case(static: DecodeStatic, B, Hkv, seq_lens, counts, *, max_sel=None, seed=0,
              nan_tail=False, page_size=None, strided=False, device="cuda"):
    """Random q/k/v and a selection: counts[b][h] distinct blocks < ceil(seq_len/bs), in
    random order, garbage after the count."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    bs, D, G = static.block_size, static.head_dim, static.group_size
    dt = DT[static.dtype]
    S = max(seq_lens)
    S_alloc = S + 5  # a length that is no multiple of the block
    q = torch.randn(B, Hkv * G, D, generator=g).to(dt)
    k = torch.randn(B, S_alloc, Hkv, D, generator=g).to(dt)
    v = torch.randn(B, S_alloc, Hkv, D, generator=g).to(dt)
    if nan_tail:
        for b, n in enumerate(seq_lens):
            k[b, n:] = float("nan")
            v[b, n:] = float("nan")
    max_sel = max_sel or max(1, max(max(c) for c in counts))
    idx = torch.randint(10**6, 10**7, (B, Hkv, max_sel), generator=g, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        nb = math.ceil(seq_lens[b] / bs)
        for h in range(Hkv):
            c = min(counts[b][h], nb)
            perm = torch.randperm(nb, generator=g)[:c].to(torch.int32)
            idx[b, h, :c] = perm
            cnt[b, h] = c
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    bt = None
    if static.layout == "paged":
        ps = static.page_size
        pages_per_seq = math.ceil(S_alloc / ps)
        num_pages = B * pages_per_seq + 3
        perm = torch.randperm(num_pages, generator=g)[:B * pages_per_seq].to(torch.int32)
        bt = perm.view(B, pages_per_seq).contiguous()
        kp = torch.full((num_pages, ps, Hkv, D), float("nan")).to(dt)
        vp = torch.full((num_pages, ps, Hkv, D), float("nan")).to(dt)
        for b in range(B):
            for p in range(pages_per_seq):
                lo, hi = p * ps, min((p + 1) * ps, S_alloc)
                kp[bt[b, p], : hi - lo] = k[b, lo:hi]
                vp[bt[b, p], : hi - lo] = v[b, lo:hi]
        k, v = kp, vp
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    k, v = to(k), to(v)
    if strided:  # the same values behind [B, H, S, D] storage: a strided [B, S, H, D] view
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.transpose(1, 2).contiguous().transpose(1, 2)
    return dict(q=to(q), k=k, v=v, block_indices=to(idx), block_counts=to(cnt),
                seq_lens=to(sl), block_table=to(bt))


def edge_cases(static):
    bs = static.block_size
    cases = {
        "tail+short+one+all": dict(B=4, Hkv=2, seq_lens=[1000, 37 if bs > 37 else bs - 3, bs, 5 * bs + 1],
                                   counts=[[7, 3], [1, 1], [1, 1], [6, 6]]),
        "mixed+empty": dict(B=3, Hkv=3, seq_lens=[3 * bs + 7, 700, 1], counts=[[0, 4, 2], [5, 0, 11], [1, 0, 1]]),
        "nan-tail": dict(B=2, Hkv=2, seq_lens=[bs * 3 + 9, 2 * bs - 1], counts=[[4, 2], [2, 1]], nan_tail=True),
        "all-empty": dict(B=1, Hkv=2, seq_lens=[300], counts=[[0, 0]]),
    }
    return cases


def check(static, config, cases=None, splits=(None,), strided=False, label=""):
    be = TileLangSparseDecode(static, config)
    ok = True
    for name, c in (cases or edge_cases(static)).items():
        c = dict(c)
        inp = make_case(static, c.pop("B"), c.pop("Hkv"), c.pop("seq_lens"), c.pop("counts"),
                        strided=strided, **c)
        if static.layout == "contiguous" and inp["block_table"] is None:
            inp.pop("block_table")
        ref = sparse_decode_reference(inp["q"], inp["k"], inp["v"], inp["block_indices"],
                                      inp["block_counts"], inp["seq_lens"], static.block_size,
                                      block_table=inp.get("block_table"))
        for ns in splits:
            out = be(**inp, num_splits=ns)
            torch.cuda.synchronize()
            err = (out.float() - ref).abs().max().item()
            finite = bool(torch.isfinite(out).all())
            zeros_ok = True
            empty = inp["block_counts"] == 0
            if empty.any():
                G = static.group_size
                mask = empty.repeat_interleave(G, dim=1)
                zeros_ok = bool((out[mask] == 0).all())
            good = finite and zeros_ok and err <= TOL[static.dtype]
            ok &= good
            rec = dict(static=static.as_dict(), config=config, case=name, num_splits=ns,
                       strided=strided, max_err=err, finite=finite, zeros_ok=zeros_ok, ok=good)
            RESULTS["correctness"].append(rec)
            if not good:
                log(f"  FAIL {label} {name} splits={ns}: err={err:.3g} finite={finite} zeros={zeros_ok}")
    log(f"correctness {'OK  ' if ok else 'FAIL'} {label} {static.as_dict()} {config}")
    return ok


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def do_bench(fn):
    import triton.testing as tt

    return tt.do_bench(fn, warmup=25, rep=200, return_mode="median")  # ms


def graph_time(fns):
    """CUDA-graph replay time of one call (ms): one graph holding every fn once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in fns:
            f()
    t = do_bench(graph.replay)
    return t / len(fns)


def loop_time(fns, reps=40):
    """Back-to-back calls, rotating over fns (ms per call): shows the Python launch cost when
    it exceeds the GPU time."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for i in range(reps):
        fns[i % len(fns)]()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def rotating(fns):
    state = [0]

    def f():
        state[0] += 1
        return fns[state[0] % len(fns)]()

    return f


def copy_bandwidth():
    a = torch.empty(1 << 29, dtype=torch.uint8, device="cuda")  # 512 MB
    b = torch.empty_like(a)
    t = do_bench(lambda: b.copy_(a))
    return 2 * a.numel() / (t * 1e-3) / 1e12


def timing(configs, batches, S=131072, Hkv=8, G=4, D=128, bs=64, sparsity=0.9, nsets=4,
           paged=False, page_size=64, sdpa=True, split_sweep=None):
    nblk = S // bs
    sel = math.ceil(nblk * (1 - sparsity))
    for B in batches:
        torch.cuda.empty_cache()
        q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
        sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
        sets = []
        for i in range(nsets):
            idx = torch.argsort(torch.rand(B, Hkv, nblk, device="cuda"), dim=-1)[..., :sel]
            sets.append(idx.to(torch.int32).contiguous())
        cnt = torch.full((B, Hkv), sel, dtype=torch.int32, device="cuda")
        bt = None
        if paged:
            num_pages = B * S // page_size
            perm = torch.randperm(num_pages, device="cuda").to(torch.int32)
            bt = perm.view(B, S // page_size).contiguous()
            kp = torch.empty(num_pages, page_size, Hkv, D, device="cuda", dtype=torch.bfloat16)
            vp = torch.empty_like(kp)
            kp[bt.long().view(-1)] = k.view(B * S // page_size, page_size, Hkv, D)
            vp[bt.long().view(-1)] = v.view(B * S // page_size, page_size, Hkv, D)
            del k, v
            k, v = kp, vp
        sel_bytes = B * Hkv * sel * bs * D * 2 * 2
        for cfg_name, cfg in configs:
            static = DecodeStatic(bs, D, G, "bf16", "paged" if paged else "contiguous",
                                  page_size if paged else 0)
            try:
                be = TileLangSparseDecode(static, cfg)
                fns = [lambda s=s: be(q, k, v, s, cnt, sl, bt) for s in sets]
                out = fns[0]()
                if cfg_name == configs[0][0] and B <= 8:  # correctness at full scale
                    ref = sparse_decode_reference(q, k, v, sets[0], cnt, sl, bs, block_table=bt,
                                                  validate=False)
                    err = (out.float() - ref).abs().max().item()
                    RESULTS["correctness"].append(dict(case=f"full-scale B={B} paged={paged}",
                                                       max_err=err, ok=err < TOL["bf16"]))
                    log(f"full-scale check B={B} paged={paged}: max err {err:.3g}")
                ns = be.num_splits(B, Hkv, sel, q.device)
                t_plain = do_bench(rotating(fns))
                t_loop = loop_time(fns)
                t_graph = graph_time(fns)
                rec = dict(B=B, S=S, paged=paged, config=cfg_name, num_splits=ns,
                           plain_us=t_plain * 1e3, loop_us=t_loop * 1e3, graph_us=t_graph * 1e3,
                           sel_TBps_plain=sel_bytes / (t_plain * 1e-3) / 1e12,
                           sel_TBps_graph=sel_bytes / (t_graph * 1e-3) / 1e12)
                RESULTS["timing"].append(rec)
                log(f"B={B:2d} {'paged' if paged else 'contig'} {cfg_name:18s} splits={ns:3d} "
                    f"plain {t_plain * 1e3:8.1f} us {rec['sel_TBps_plain']:.2f} TB/s | loop "
                    f"{t_loop * 1e3:8.1f} us | graph "
                    f"{t_graph * 1e3:8.1f} us {rec['sel_TBps_graph']:.2f} TB/s")
                if split_sweep and B in split_sweep:
                    for ns in split_sweep[B]:
                        f2 = [lambda s=s, ns=ns: be(q, k, v, s, cnt, sl, bt, num_splits=ns) for s in sets]
                        tg = graph_time(f2)
                        RESULTS["timing"].append(dict(B=B, S=S, paged=paged, config=cfg_name,
                                                      num_splits=ns, graph_us=tg * 1e3,
                                                      sel_TBps_graph=sel_bytes / (tg * 1e-3) / 1e12))
                        log(f"    splits={ns:3d} graph {tg * 1e3:8.1f} us "
                            f"{sel_bytes / (tg * 1e-3) / 1e12:.2f} TB/s")
            except Exception as e:  # keep going: a failed config is a result
                RESULTS["errors"].append(dict(B=B, config=cfg_name, error=repr(e)[-2000:]))
                log(f"B={B} {cfg_name} ERROR {repr(e)[-800:]}")
        if sdpa and not paged:
            try:
                import torch.nn.functional as F

                kt = k.transpose(1, 2).contiguous()
                vt = v.transpose(1, 2).contiguous()
                q4 = q.view(B, Hkv * G, 1, D)
                f = lambda: F.scaled_dot_product_attention(q4, kt, vt, enable_gqa=True)  # noqa: E731
                t = do_bench(f)
                tg = graph_time([f])
                tl_ = loop_time([f])
                dense_bytes = B * S * Hkv * D * 2 * 2
                RESULTS["timing"].append(dict(B=B, S=S, config="dense-sdpa", plain_us=t * 1e3,
                                              graph_us=tg * 1e3,
                                              kv_TBps=dense_bytes / (t * 1e-3) / 1e12))
                log(f"B={B:2d} dense SDPA  {t * 1e3:8.1f} us (loop {tl_ * 1e3:8.1f}, graph {tg * 1e3:8.1f}) "
                    f"{dense_bytes / (t * 1e-3) / 1e12:.2f} TB/s of all KV")
                del kt, vt
            except Exception as e:
                log(f"SDPA ERROR {e!r}"[:500])
        del q, k, v
        torch.cuda.empty_cache()


def make_inputs(B, S, sel, nsets, Hkv=8, G=4, D=128, bs=64):
    q = torch.randn(B, Hkv * G, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(B, S, Hkv, D, device="cuda", dtype=torch.bfloat16)
    sl = torch.full((B,), S, dtype=torch.int32, device="cuda")
    nblk = S // bs
    sets = [torch.argsort(torch.rand(B, Hkv, nblk, device="cuda"), dim=-1)[..., :sel]
            .to(torch.int32).contiguous() for _ in range(nsets)]
    cnt = torch.full((B, Hkv), sel, dtype=torch.int32, device="cuda")
    return q, k, v, sl, sets, cnt


def cpu_us(fn, n=300):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t) / n
    torch.cuda.synchronize()
    return t * 1e6


def overhead(full=True):
    """Per-call CPU cost at a tiny shape (GPU work ~ a few us) and the GPU floor of a call."""
    import sparsegen.codegen.tilelang_decode as tld

    st = DecodeStatic(64, 128, 4)
    base = TileLangSparseDecode.default_config(st)
    be = TileLangSparseDecode(st, base)
    # -- per-call CPU cost at a tiny shape (GPU work ~ a few us) --------------------------
    q, k, v, sl, sets, cnt = make_inputs(1, 4096, 8, 1)
    idx = sets[0]
    res = {}
    res["call"] = cpu_us(lambda: be(q, k, v, idx, cnt, sl))
    ex = be._kernel(q.device)
    ws = torch.empty(32 * 16 * 129, device="cuda")
    op, lse = ws[:32 * 16 * 128].view(1, 32, 16, 128), ws[32 * 16 * 128:].view(1, 32, 16)
    out = torch.empty(1, 32, 128, device="cuda", dtype=torch.bfloat16)
    res["executable_prealloc"] = cpu_us(lambda: ex(q, k, v, idx, cnt, sl, lse, op, out, 0.1))
    jk = be._compile_for(q.device)
    res["jit_wrapper_prealloc"] = cpu_us(lambda: jk(q, k, v, idx, cnt, sl, lse, op, out, 0.1))
    res["torch_empty_x2"] = cpu_us(lambda: (torch.empty(32 * 16 * 129, device="cuda"),
                                            torch.empty(1, 32, 128, device="cuda")))
    if full:
        for name, cfg in (("cpasync", {**base, "warp_specialize": False}),):
            b2 = TileLangSparseDecode(st, cfg)
            res[f"call_{name}"] = cpu_us(lambda: b2(q, k, v, idx, cnt, sl))
        try:
            tld.EXEC_BACKEND = "cython"
            b3 = TileLangSparseDecode(st, base)
            res["call_cython_backend"] = cpu_us(lambda: b3(q, k, v, idx, cnt, sl))
        except Exception as e:
            res["call_cython_backend"] = repr(e)[:300]
        finally:
            tld.EXEC_BACKEND = "tvm_ffi"
    for ns in (1, 16):
        res[f"graph_tiny_ns{ns}"] = graph_time([lambda ns=ns: be(q, k, v, idx, cnt, sl, num_splits=ns)]) * 1e3
    log("overhead (us):", json.dumps({k_: (round(v_, 2) if isinstance(v_, float) else v_)
                                       for k_, v_ in res.items()}))
    RESULTS["overhead_us"] = res


def phase2():
    """Launch overhead, split sweeps and CTA-per-SM variants."""
    overhead()
    st = DecodeStatic(64, 128, 4)
    base = TileLangSparseDecode.default_config(st)
    # -- split sweeps at the target shape -----------------------------------------------
    variants = {
        "default(bh16,2cta)": base,
        "bh16-bn32-st3-3cta": {**base, "block_n": 32, "num_stages": 3, "min_blocks_per_sm": 3,
                               "waves": 3},
        "bh16-1cta": {**base, "min_blocks_per_sm": 1, "waves": 1},
        "bh16-st3-1cta": {**base, "num_stages": 3, "min_blocks_per_sm": 1, "waves": 1},
    }
    S, sel = 131072, math.ceil(2048 * 0.1)
    sweeps = {1: [8, 12, 16, 24, 33, 48], 8: [1, 2, 3, 4, 8], 16: [1, 2, 4]}
    for B, nss in sweeps.items():
        torch.cuda.empty_cache()
        q, k, v, sl, sets, cnt = make_inputs(B, S, sel, 4)
        sel_bytes = B * 8 * sel * 64 * 128 * 2 * 2
        for name, cfg in variants.items():
            try:
                b = TileLangSparseDecode(st, cfg)
                line = []
                for ns in [None] + nss:
                    tg = graph_time([lambda s=s, ns=ns: b(q, k, v, s, cnt, sl, num_splits=ns)
                                     for s in sets])
                    nsv = b.num_splits(B, 8, sel, q.device) if ns is None else ns
                    RESULTS["timing"].append(dict(phase=2, B=B, config=name, num_splits=nsv,
                                                  heuristic=ns is None, graph_us=tg * 1e3,
                                                  sel_TBps_graph=sel_bytes / (tg * 1e-3) / 1e12))
                    line.append(f"{'h' if ns is None else ''}{nsv}:{tg * 1e3:.1f}us/"
                                f"{sel_bytes / (tg * 1e-3) / 1e12:.2f}")
                log(f"B={B:2d} {name:20s} " + " ".join(line))
            except Exception as e:
                RESULTS["errors"].append(dict(phase=2, B=B, config=name, error=repr(e)[-1500:]))
                log(f"B={B} {name} ERROR {repr(e)[-600:]}")
        del q, k, v
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--phase", type=int, default=1,
                    help="1: correctness + timing of 6 configs; 2: overhead and split sweeps; "
                         "3: overhead and timing of the default config")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "tilelang_smoke.json"))
    args = ap.parse_args()
    require_cuda()
    log("device:", torch.cuda.get_device_name(0), "SMs", torch.cuda.get_device_properties(0).multi_processor_count)
    t0 = time.time()
    if args.phase in (2, 3):
        try:
            if args.phase == 2:
                phase2()
            else:  # the default config: overhead, then timing at batch 1 / 8 / 16
                overhead(full=False)
                base = TileLangSparseDecode.default_config(DecodeStatic(64, 128, 4))
                log(f"copy bandwidth (read+write): {copy_bandwidth():.2f} TB/s")
                timing([("default", base)], batches=(1, 8, 16), sdpa=False)
                timing([("default", base)], batches=(16,), paged=True, sdpa=False)
        finally:
            log(f"== phase 2 done ({time.time() - t0:.0f}s)")
            with open(args.json, "w") as f:
                json.dump(RESULTS, f, indent=1)
        return

    base = TileLangSparseDecode.default_config(DecodeStatic(64, 128, 4))
    cfgs = {
        "default": base,
        "bh64-wgmma": {**base, "block_h": 64},
        "bh64-wgmma-1cta": {**base, "block_h": 64, "min_blocks_per_sm": 1},
        "bn32-st3-3cta": {**base, "block_n": 32, "num_stages": 3, "min_blocks_per_sm": 3,
                          "waves": 3},
        "cpasync": {**base, "warp_specialize": False},
        "cpasync-bh64": {**base, "warp_specialize": False, "block_h": 64},
    }

    # ---- correctness --------------------------------------------------------------------
    all_ok = True
    for dt in ("bf16", "fp16"):
        for layout, ps in (("contiguous", 0), ("paged", 128)):
            st = DecodeStatic(64, 128, 4, dt, layout, ps)
            try:
                all_ok &= check(st, base, splits=(None, 1, 3, 64), label=f"default/{dt}/{layout}")
            except Exception:
                all_ok = False
                RESULTS["errors"].append(dict(stage="correctness", error=traceback.format_exc()[-3000:]))
                log(traceback.format_exc()[-3000:])
    try:
        all_ok &= check(DecodeStatic(64, 128, 4), base, splits=(None,), strided=True, label="strided")
    except Exception:
        all_ok = False
        log(traceback.format_exc()[-3000:])
    for name, cfg in cfgs.items():
        if name == "default":
            continue
        try:
            all_ok &= check(DecodeStatic(64, 128, 4), cfg, splits=(None, 5), label=name)
        except Exception:
            all_ok = False
            RESULTS["errors"].append(dict(stage="correctness", config=name, error=traceback.format_exc()[-3000:]))
            log(f"{name}: " + traceback.format_exc()[-3000:])
    others = [
        (DecodeStatic(32, 64, 8, "fp16", "contiguous"), {**base, "block_n": 32}),
        (DecodeStatic(128, 128, 16, "bf16", "paged", 256), {**base, "block_n": 64}),
        (DecodeStatic(16, 128, 1, "bf16", "contiguous"), {**base, "block_n": 16}),
    ]
    if not args.quick:
        for st, cfg in others:
            try:
                all_ok &= check(st, cfg, splits=(None, 2), label="other")
            except Exception:
                all_ok = False
                log(traceback.format_exc()[-3000:])
    log(f"== correctness {'ALL OK' if all_ok else 'FAILURES'} ({time.time() - t0:.0f}s)")

    # ---- timing -------------------------------------------------------------------------
    log(f"copy bandwidth (read+write): {copy_bandwidth():.2f} TB/s")
    timing(list(cfgs.items()), batches=(1, 8, 16),
           split_sweep={1: [16, 33, 66, 132]})
    log(f"({time.time() - t0:.0f}s)")
    timing([("default", base)], batches=(8,), paged=True, sdpa=False)
    log(f"== done ({time.time() - t0:.0f}s)")
    RESULTS["all_ok"] = all_ok
    with open(args.json, "w") as f:
        json.dump(RESULTS, f, indent=1)


if __name__ == "__main__":
    main()
