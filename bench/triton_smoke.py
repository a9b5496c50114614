"""GPU smoke test and timing of the Triton block-sparse decode (sparsegen.codegen.triton_decode).

  source .gpu/prelude.sh && python3 bench/triton_smoke.py [--quick]

1. correctness vs sparse_decode_reference (fp32) in bf16 and fp16, contiguous and paged, for
   several static variants, mixed lengths, NaN past seq_len, empty heads, forced split counts,
   eager vs CUDA-graph replay;
2. timing of the H100 target (Hq 32 / Hkv 8 / D 128 / block 64, bf16, 128K context, 10% of
   the blocks selected) at batch 1, 8, 16 over a few configs and split counts:
   triton.testing.do_bench (median, L2 flushed) and CUDA-graph replay over 4 rotating input
   sets, bandwidth of the selected K+V bytes, host time of a plain call;
3. dense torch SDPA (enable_gqa, cuDNN if available) on the full 128K cache as a baseline.
Prints a table and writes $OUT/triton_smoke.json (or bench/results/ when OUT is unset).
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from bench.timing import require_cuda  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.codegen.triton_decode import TritonSparseDecode as T  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402

T0 = time.time()
BUDGET_S = float(os.environ.get("SMOKE_BUDGET_S", 330))
QUICK = "--quick" in sys.argv
DEV = "cuda"
DT = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUT_DIR = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
require_cuda()  # before RES asks the device its name
RES: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
             "triton": triton.__version__, "sms": torch.cuda.get_device_properties(0).multi_processor_count,
             "correctness": [], "timing": [], "dense": [], "notes": []}


def save():
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(os.path.join(OUT_DIR, "triton_smoke.json"), "w") as f:
        json.dump(RES, f, indent=1)


def left() -> float:
    return BUDGET_S - (time.time() - T0)


# ------------------------------------------------------------------------------------------
# 1. correctness
# ------------------------------------------------------------------------------------------
def selection(B, Hkv, seq_lens, bs, frac, gen, max_sel=None):
    """Random subset (random order) of each sequence's blocks, ~frac of them, >= 1."""
    nb = [(int(n) + bs - 1) // bs for n in seq_lens]
    cnts = [[max(1, min(nb[b], round(frac * nb[b]))) for _ in range(Hkv)] for b in range(B)]
    width = max_sel or max(max(r) for r in cnts)
    idx = torch.full((B, Hkv, width), -5, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, dtype=torch.int32)
    for b in range(B):
        for h in range(Hkv):
            c = min(cnts[b][h], width)
            idx[b, h, :c] = torch.randperm(nb[b], generator=gen)[:c].int()
            cnt[b, h] = c
    return idx.to(DEV), cnt.to(DEV)


def check_case(bs, D, G, dtype, layout, page_size, cfg=None, B=3, Hkv=4, seqs=(3000, 777, 40),
               frac=0.3):
    gen = torch.Generator().manual_seed(bs * 7 + D + G)
    st = DecodeStatic(bs, D, G, dtype, layout, page_size)
    be = T(st, {**T.default_config(st), **(cfg or {})})
    dt = DT[dtype]
    S = max(seqs) + bs
    q = torch.randn(B, Hkv * G, D, device=DEV, dtype=dt)
    k = torch.randn(B, S, Hkv, D, device=DEV, dtype=dt)
    v = torch.randn(B, S, Hkv, D, device=DEV, dtype=dt)
    for b, n in enumerate(seqs):
        k[b, n:] = float("nan")
        v[b, n:] = float("nan")
    seq = torch.tensor(seqs, dtype=torch.int32, device=DEV)
    idx, cnt = selection(B, Hkv, seqs, bs, frac, gen)
    cnt[0, 1] = 0  # an empty head
    kw = {}
    kk, vv = k, v
    if layout == "paged":
        pages = (S + page_size - 1) // page_size
        pool = B * pages + 5
        perm = torch.randperm(pool, generator=gen)
        kk = torch.full((pool, page_size, Hkv, D), float("nan"), device=DEV, dtype=dt)
        vv = kk.clone()
        table = torch.zeros(B, pages, dtype=torch.int32)
        for b in range(B):
            for p in range(pages):
                pg = int(perm[b * pages + p])
                table[b, p] = pg
                lo, hi = p * page_size, min(S, (p + 1) * page_size)
                kk[pg, :hi - lo] = k[b, lo:hi]
                vv[pg, :hi - lo] = v[b, lo:hi]
        kw["block_table"] = table.to(DEV)
    ref = sparse_decode_reference(q, kk, vv, idx, cnt, seq, bs, **kw)
    worst = 0.0
    same = True
    for ns in (None, 1, 7, 64):
        outs = []
        for _ in range(2):  # the same result twice (fresh workspace each call)
            out = be(q, kk, vv, idx, cnt, seq, num_splits=ns, **kw)
            torch.cuda.synchronize()
            ok_finite = bool(torch.isfinite(out).all())
            rel = float((out.float() - ref).norm() / ref.norm())
            zero_head = float(out[0, G:2 * G].abs().max())
            worst = max(worst, rel if ok_finite else float("inf"), zero_head * 1e9)
            outs.append(out)
        same &= bool(torch.equal(outs[0], outs[1]))
    # CUDA graph replay computes the same thing
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        be(q, kk, vv, idx, cnt, seq, **kw)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gout = be(q, kk, vv, idx, cnt, seq, **kw)
    g.replay()
    torch.cuda.synchronize()
    eager = be(q, kk, vv, idx, cnt, seq, **kw)
    graph_ok = bool(torch.equal(gout, eager))
    tol = 2e-2 if dtype == "bf16" else 5e-3
    rec = dict(static=st.as_dict(), config=be.config, rel_err=worst, graph_equal=graph_ok,
               repeat_equal=same, ok=worst < tol and graph_ok and same)
    RES["correctness"].append(rec)
    print(f"check bs{bs} D{D} G{G} {dtype} {layout:10s} bn{be.config['block_n']} "
          f"pdl{be.config.get('pdl', 0)} rel_err {worst:.2e} graph_eq {graph_ok} "
          f"repeat_eq {same} -> {'OK' if rec['ok'] else 'FAIL'}", flush=True)
    return rec["ok"]


def correctness():
    cases = [(64, 128, 4, "contiguous", 0, None), (64, 128, 4, "paged", 256, None),
             (16, 128, 8, "contiguous", 0, None), (16, 64, 2, "paged", 64, None),
             (128, 64, 16, "contiguous", 0, None), (128, 128, 1, "paged", 128, {"block_n": 32}),
             (32, 128, 4, "contiguous", 0, {"block_n": 128, "num_stages": 2}),
             (64, 128, 4, "contiguous", 0, {"pdl": 1}), (64, 128, 8, "paged", 64, {"pdl": 1}),
             (16, 128, 4, "contiguous", 0, {"pdl": 1, "waves": 3})]
    ok = True
    for dtype in ("bf16", "fp16"):
        for bs, D, G, lay, ps, cfg in cases:
            ok &= check_case(bs, D, G, dtype, lay, ps, cfg)
    save()
    return ok


# ------------------------------------------------------------------------------------------
# 2. timing
# ------------------------------------------------------------------------------------------
def graph_time(fns, reps=20):
    """ms per call, replaying one CUDA graph that calls every fn once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def rotating(fns):
    state = [0]

    def f():
        fns[state[0] % len(fns)]()
        state[0] += 1
    return f


def host_time(fn, n=200):
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n * 1e3
    torch.cuda.synchronize()
    return host


class Target:
    """Hq 32 / Hkv 8 / D 128 / block 64 bf16 cache of 16 x 128K tokens (8 GiB K+V)."""

    def __init__(self, B=16, S=131072, Hkv=8, G=4, D=128, bs=64):
        self.B, self.S, self.Hkv, self.G, self.D, self.bs = B, S, Hkv, G, D, bs
        self.k = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
        self.v = torch.randn(B, S, Hkv, D, device=DEV, dtype=torch.bfloat16)
        self.qs = [torch.randn(B, Hkv * G, D, device=DEV, dtype=torch.bfloat16) for _ in range(4)]

    def sels(self, B, ctx, frac, bs=None, sets=4):
        bs = bs or self.bs
        nb = ctx // bs
        c = max(1, round(frac * nb))
        out = []
        for _ in range(sets):
            idx = torch.rand(B, self.Hkv, nb, device=DEV).argsort(-1)[..., :c].to(torch.int32)
            cnt = torch.full((B, self.Hkv), c, dtype=torch.int32, device=DEV)
            out.append((idx.contiguous(), cnt))
        seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
        sel_bytes = B * self.Hkv * c * bs * self.D * 2 * 2
        return out, seq, sel_bytes


def time_config(tg, B, ctx, cfg, frac=0.1, num_splits=None, layout="contiguous", ps=256,
                bs=64, label=""):
    st = DecodeStatic(bs, tg.D, tg.G, "bf16", layout, ps if layout == "paged" else 0)
    be = T(st, {**T.default_config(st), **cfg})
    sels, seq, sel_bytes = tg.sels(B, ctx, frac, bs)
    k, v = tg.k[:B, :ctx], tg.v[:B, :ctx]
    kw = {}
    if layout == "paged":
        # the same memory seen as pages of a pool, with a random (non-identity) block table
        kp = tg.k[:B].view(B * tg.S // ps, ps, tg.Hkv, tg.D)
        vp = tg.v[:B].view(B * tg.S // ps, ps, tg.Hkv, tg.D)
        table = torch.randperm(B * tg.S // ps, device=DEV)[:B * (ctx // ps)]
        kw["block_table"] = table.view(B, ctx // ps).to(torch.int32).contiguous()
        k, v = kp, vp
    fns = [(lambda i=i: be(tg.qs[i][:B], k, v, sels[i][0], sels[i][1], seq,
                           num_splits=num_splits, **kw)) for i in range(4)]
    ns = num_splits or be.num_splits(B, tg.Hkv, sels[0][0].shape[-1], torch.device(DEV))
    fns[0]()
    torch.cuda.synchronize()
    t_bench = triton.testing.do_bench(rotating(fns), warmup=25, rep=150, return_mode="median")
    t_graph = graph_time(fns)
    t_host = host_time(fns[0], 100)
    rec = dict(label=label, B=B, ctx=ctx, frac=frac, layout=layout, block_size=bs,
               config=be.config, num_splits=ns, sel_MB=sel_bytes / 1e6,
               do_bench_us=t_bench * 1e3, graph_us=t_graph * 1e3, host_us=t_host * 1e3,
               TBps_do_bench=sel_bytes / (t_bench * 1e-3) / 1e12,
               TBps_graph=sel_bytes / (t_graph * 1e-3) / 1e12)
    RES["timing"].append(rec)
    c = be.config
    print(f"{label:10s} B{B:<3d} ctx{ctx // 1024}K {layout[:4]} bs{bs} bn{c['block_n']} w{c['num_warps']} "
          f"st{c['num_stages']} wv{c['waves']} pdl{c.get('pdl', 0)} splits{ns:<4d} sel {sel_bytes / 1e6:7.1f} MB  "
          f"do_bench {t_bench * 1e3:8.1f} us {rec['TBps_do_bench']:5.2f} TB/s  graph "
          f"{t_graph * 1e3:8.1f} us {rec['TBps_graph']:5.2f} TB/s  host {t_host * 1e3:5.1f} us",
          flush=True)
    save()
    return rec


def dense_baseline(tg, B, ctx):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    kh = tg.k[:B, :ctx].transpose(1, 2).contiguous()  # [B, Hkv, S, D]
    vh = tg.v[:B, :ctx].transpose(1, 2).contiguous()
    qs = [q[:B].unsqueeze(2) for q in tg.qs]           # [B, Hq, 1, D]
    for name, backends in (("cudnn", [SDPBackend.CUDNN_ATTENTION]),
                           ("flash/eff", [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])):
        try:
            with sdpa_kernel(backends):
                fns = [(lambda q=q: torch.nn.functional.scaled_dot_product_attention(
                    q, kh, vh, enable_gqa=True)) for q in qs]
                fns[0]()
                torch.cuda.synchronize()
                t = triton.testing.do_bench(rotating(fns), warmup=25, rep=150, return_mode="median")
        except Exception as e:  # noqa: BLE001
            RES["notes"].append(f"SDPA {name} B{B}: {type(e).__name__}: {str(e)[:200]}")
            continue
        nbytes = kh.numel() * 2 * 2
        rec = dict(backend=name, B=B, ctx=ctx, us=t * 1e3, TBps=nbytes / (t * 1e-3) / 1e12)
        RES["dense"].append(rec)
        print(f"dense SDPA {name:9s} B{B:<3d} ctx{ctx // 1024}K  {t * 1e3:8.1f} us  "
              f"{rec['TBps']:5.2f} TB/s of full KV", flush=True)
        break
    del kh, vh
    torch.cuda.empty_cache()


def recompiles(tg):
    """Different contexts / selection widths / split counts must reuse one compiled kernel."""
    st = DecodeStatic(64, 128, 4, "bf16")
    be = T(st)
    for ctx, frac, ns in ((8192, 0.1, None), (32768, 0.05, None), (131072, 0.1, 3),
                          (131072, 0.2, 1), (4096, 1.0, 17)):
        sels, seq, _ = tg.sels(2, ctx, frac, sets=1)
        be(tg.qs[0][:2], tg.k[:2, :ctx], tg.v[:2, :ctx], sels[0][0], sels[0][1], seq,
           num_splits=ns)
    torch.cuda.synchronize()
    n = {name: len(getattr(be.module, name).device_caches[0][0])
         for name in ("sparse_decode_split", "sparse_decode_merge")}
    RES["compiled_variants_over_5_shapes"] = n
    print("compiled variants over 5 contexts/widths/split counts:", n, flush=True)


def main():
    print(f"device: {RES['device']}  torch {torch.__version__}  triton {triton.__version__}", flush=True)
    ok = correctness()
    print(f"correctness: {'all OK' if ok else 'FAILURES'}  ({time.time() - T0:.0f}s)", flush=True)
    if not ok:
        RES["notes"].append("correctness failed; timing skipped")
        save()
        sys.exit(1)
    tg = Target()
    recompiles(tg)
    base = T.default_config(DecodeStatic(64, 128, 4, "bf16"))
    configs = [("default", {}), ("pdl", {"pdl": 1}),
               ("st3", {"num_stages": 3}), ("st5", {"num_stages": 5}),
               ("wv2", {"waves": 2}), ("wv3", {"waves": 3}), ("wv3pdl", {"waves": 3, "pdl": 1}),
               ("w8", {"num_warps": 8}), ("bn128st2", {"block_n": 128, "num_stages": 2})]
    if QUICK:
        configs = configs[:3]
    for B in (1, 8, 16, 4, 2):
        for label, cfg in configs if B in (1, 8, 16) else configs[:2] + configs[5:7]:
            if left() < 70:
                RES["notes"].append(f"budget: stopped sweeping at B{B} {label}")
                break
            time_config(tg, B, 131072, {**base, **cfg}, label=label)
    for ns in (8, 12, 20, 24, 33):
        if left() < 60:
            break
        time_config(tg, 1, 131072, {**base, "pdl": 1}, num_splits=ns, label=f"split{ns}")
    for B in (1, 8, 16):
        if left() < 50:
            break
        dense_baseline(tg, B, 131072)
    if left() > 40:
        dense_baseline(tg, 1, 32768)
        time_config(tg, 1, 32768, base, label="ctx32K")
        time_config(tg, 1, 32768, {**base, "pdl": 1}, label="ctx32Kpdl")
    if left() > 30:
        time_config(tg, 8, 131072, base, layout="paged", ps=256, label="paged256")
        time_config(tg, 1, 131072, base, layout="paged", ps=256, label="paged256")
        time_config(tg, 8, 131072, base, layout="paged", ps=64, label="paged64")
    if left() > 20:
        time_config(tg, 8, 131072, {}, bs=16, label="block16")
        time_config(tg, 1, 131072, {}, bs=16, label="block16")
        time_config(tg, 8, 131072, {}, bs=128, label="block128")
        time_config(tg, 8, 131072, {}, bs=32, label="block32")
    save()
    print(f"done in {time.time() - T0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
