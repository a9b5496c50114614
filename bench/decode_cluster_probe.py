"""Probe: the decode attention's merge done inside the split kernel by a thread-block cluster.

    python bench/decode_cluster_probe.py                 # on an H100
    python bench/decode_cluster_probe.py --compile-only  # no GPU: lower + nvcc every variant

bench/decode_layout_probe.py priced the merge launch at batch 8 and 32K: 2.7 us of 46 with 7
splits, 6.3 us of 102 with 12. This probe tests the lever bench/NOTES.md names for it. The
splits of one (batch, KV head) row are the CTAs of one cluster. Each CTA attends its share
of the row's selected blocks, as the split kernel of templates/tilelang/sparse_decode.py.j2
does. Each rank above 0 then stores its normalised partial output and base-2 log-sum-exp
into rank 0's shared memory through distributed shared memory. After a cluster barrier,
rank 0 merges them and writes the output. There is no second launch, and no partials in
global memory.

The kernel here is a probe, not a template: it serves the contiguous bf16 layout at block
64, head dim 128, group 4 (the example specs' attention) and the cluster sizes 2, 4 and 8.
It is checked against the fp32 torch reference, then timed beside the attention the emitted
seer-attention-r module runs at the shape, and beside its two-launch twin: the production
TileLang split kernel at the same tile and load form with C splits, then its merge launch.
The twin tells a cluster kernel that loses to the baseline because of the merge it does
from one that loses because TileLang's split kernel is slower than Triton's at the shape.
Each time is the median ms per call of CUDA graphs of 8 calls, with the ROTATE input sets
of decode_layout_probe.decode_inputs in turn.
"""
# no `from __future__ import annotations`: TileLang reads the prim_func's annotations as
# objects (string annotations would be looked up among the module's globals and fail)
import argparse
import json
import os
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402
from bench.decode_layout_probe import decode_inputs  # noqa: E402
from bench.emitted import emitted_attention  # noqa: E402
from bench.timing import (fmt, gpu_facts, rel_err, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph_per_call)

HQ, HKV, D, BLOCK, GROUP = 32, 8, 128, 64, 4
LOG2E = 1.4426950408889634
# (cluster, warp_specialize): the variants timed
VARIANTS = [(2, True), (4, True), (8, True), (2, False), (4, False), (8, False)]
CASES = [(8, 32768, 0.1), (8, 32768, 0.25), (16, 32768, 0.1), (8, 131072, 0.1)]


# the tile every cluster variant (and its two-launch twin) runs
TILE = {"block_h": 16, "threads": 128, "num_stages": 2}


def cluster_decode_module(cluster: int, warp_specialize: bool, threads: int = TILE["threads"],
                          block_h: int = TILE["block_h"], num_stages: int = TILE["num_stages"]):
    """The probe kernel as a module-like object (build(), PASS_CONFIGS) for tilelang_build."""
    import tilelang
    import tilelang.language as T

    C, G, BH, BN, BS = cluster, GROUP, block_h, BLOCK, BLOCK

    def build():
        dtype, accum = T.bfloat16, T.float32
        NEG_INF = -T.infinity(accum)
        batch = T.dynamic("batch")
        heads = T.dynamic("heads")
        heads_kv = T.dynamic("heads_kv")
        max_sel = T.dynamic("max_sel")
        seqlen = T.dynamic("seqlen")
        kv_shape = [batch, seqlen, heads_kv, D]

        @T.prim_func
        def cluster_decode(
            Q: T.Tensor([batch, heads, D], dtype),
            K: T.Tensor(kv_shape, dtype),
            V: T.Tensor(kv_shape, dtype),
            block_indices: T.Tensor([batch, heads_kv, max_sel], T.int32),
            block_counts: T.Tensor([batch, heads_kv], T.int32),
            seq_lens: T.Tensor([batch], T.int32),
            out: T.Tensor([batch, heads, D], dtype),
            scale_log2: T.float32,
        ):
            with T.Kernel(heads_kv * C, batch, threads=threads,
                          cluster_dims=(C, 1, 1)) as (hc, b):
                h = hc // C
                rank = hc % C   # the grid's x is whole clusters: the CTA's rank in its own
                Q_shared = T.alloc_shared([BH, D], dtype)
                K_shared = T.alloc_shared([BN, D], dtype)
                V_shared = T.alloc_shared([BN, D], dtype)
                V_tail = T.alloc_shared([BN, D], dtype)
                P_shared = T.alloc_shared([BH, BN], dtype)
                o_gather = T.alloc_shared([C, G, D], accum)   # rank r's partial at [r]
                lse_gather = T.alloc_shared([C, G], accum)
                acc_s = T.alloc_fragment([BH, BN], accum)
                acc_o = T.alloc_fragment([BH, D], accum)
                m_cur = T.alloc_fragment([BH], accum)
                m_prev = T.alloc_fragment([BH], accum)
                alpha = T.alloc_fragment([BH], accum)
                row_sum = T.alloc_fragment([BH], accum)
                l_sum = T.alloc_fragment([BH], accum)
                tx = T.get_thread_binding()
                mx = T.alloc_var(accum)
                num = T.alloc_var(accum)
                den = T.alloc_var(accum)
                w = T.alloc_var(accum)

                # The gather buffers must be live for the whole kernel: TileLang reuses shared
                # memory by lifetime, and a rank that finishes early writes into rank 0's
                # copy while rank 0 may still be in its loop (a first build aliased them with
                # Q_shared and K_shared, and every output was wrong). Touching them here pins
                # them; the barrier keeps a fast rank's store from landing before this clear.
                T.clear(o_gather)
                T.clear(lse_gather)
                T.cluster_sync()

                seq_len = seq_lens[b]
                count = block_counts[b, h]
                per = count // C
                rem = count % C
                n_blk = per + T.if_then_else(rank < rem, 1, 0)
                first = per * rank + T.min(rank, rem)

                for i, d in T.Parallel(BH, D):
                    Q_shared[i, d] = T.if_then_else(i < G, Q[b, h * G + i, d], T.cast(0, dtype))
                T.fill(acc_o, 0)
                T.fill(l_sum, 0)
                T.fill(m_cur, NEG_INF)

                for k in T.Pipelined(n_blk, num_stages=num_stages):
                    tok0 = block_indices[b, h, first + k] * BS
                    T.copy(K[b, tok0:tok0 + BN, h, :], K_shared)
                    T.clear(acc_s)
                    T.gemm(Q_shared, K_shared, acc_s, transpose_B=True,
                           policy=T.GemmWarpPolicy.FullRow)
                    for i, j in T.Parallel(BH, BN):
                        acc_s[i, j] = T.if_then_else(tok0 + j < seq_len, acc_s[i, j] * scale_log2,
                                                     NEG_INF)
                    T.copy(m_cur, m_prev)
                    T.reduce_max(acc_s, m_cur, dim=1, clear=False)
                    for i in T.Parallel(BH):
                        alpha[i] = T.exp2(m_prev[i] - T.if_then_else(m_cur[i] == NEG_INF, 0,
                                                                     m_cur[i]))
                    for i, j in T.Parallel(BH, BN):
                        acc_s[i, j] = T.exp2(acc_s[i, j] - T.if_then_else(m_cur[i] == NEG_INF, 0,
                                                                          m_cur[i]))
                    T.reduce_sum(acc_s, row_sum, dim=1)
                    for i in T.Parallel(BH):
                        l_sum[i] = l_sum[i] * alpha[i] + row_sum[i]
                    T.copy(acc_s, P_shared)
                    for i, d in T.Parallel(BH, D):
                        acc_o[i, d] *= alpha[i]
                    T.copy(V[b, tok0:tok0 + BN, h, :], V_shared)
                    if tok0 + BN > seq_len:
                        for j, d in T.Parallel(BN, D):
                            V_tail[j, d] = T.if_then_else(tok0 + j < seq_len, V_shared[j, d],
                                                          T.cast(0, dtype))
                        T.gemm(P_shared, V_tail, acc_o, policy=T.GemmWarpPolicy.FullRow)
                    else:
                        T.gemm(P_shared, V_shared, acc_o, policy=T.GemmWarpPolicy.FullRow)

                # this rank's normalised partial into its own slot; an empty share: -inf, 0
                for i, d in T.Parallel(BH, D):
                    if i < G:
                        o_gather[rank, i, d] = T.if_then_else(l_sum[i] > 0, acc_o[i, d] / l_sum[i], 0)
                for i in T.Parallel(BH):
                    if i < G:
                        lse_gather[rank, i] = T.if_then_else(l_sum[i] > 0, T.log2(l_sum[i]) + m_cur[i],
                                                             NEG_INF)
                T.sync_threads()
                # ranks above 0 store their slot into rank 0's; the barrier orders the stores
                # before rank 0 reads them and keeps every CTA resident till then
                if rank > 0:
                    T.copy_cluster(o_gather[rank:rank + 1, 0:G, 0:D],
                                   o_gather[rank:rank + 1, 0:G, 0:D], dst_block=0)
                    T.copy_cluster(lse_gather[rank:rank + 1, 0:G],
                                   lse_gather[rank:rank + 1, 0:G], dst_block=0)
                T.cluster_sync()
                if rank == 0:
                    # thread tx merges elements tx, tx + threads, ... of the [G, D] output
                    for e in T.serial(G * D // threads):
                        i = (tx + e * threads) // D
                        d = (tx + e * threads) % D
                        mx = lse_gather[0, i]
                        for c in T.serial(1, C):
                            mx = T.max(mx, lse_gather[c, i])
                        num = 0.0
                        den = 0.0
                        for c in T.serial(C):
                            w = T.if_then_else(lse_gather[c, i] == NEG_INF, 0.0,
                                               T.exp2(lse_gather[c, i] - mx))
                            num = num + w * o_gather[c, i, d]
                            den = den + w
                        out[b, h * G + i, d] = T.cast(T.if_then_else(den > 0, num / den, 0.0), dtype)

        return cluster_decode

    configs = {tilelang.PassConfigKey.TL_ENABLE_FAST_MATH: False,
               "tl.UnrollLoop": {"explicit_unroll": True}}
    if not warp_specialize:
        configs[tilelang.PassConfigKey.TL_DISABLE_WARP_SPECIALIZED] = True
    return types.SimpleNamespace(build=build, PASS_CONFIGS=configs)


def variant_name(cluster: int, ws: bool, form: str = "cluster") -> str:
    """cluster4_tma: the cluster kernel; twolaunch4_tma: its two-launch twin."""
    return f"{form}{cluster}_{'tma' if ws else 'cpasync'}"


def compile_only() -> int:
    """Lower and nvcc-compile every variant for sm_90a (no GPU); 1 if any fails."""
    from sparsegen.codegen.tilelang_build import lower_sm90

    failed = 0
    for cluster, ws in VARIANTS:
        name = variant_name(cluster, ws)
        try:
            _, src, cubin = lower_sm90(cluster_decode_module(cluster, ws), name)
            print(f"{name}: ok ({len(cubin)} B cubin, cluster dims in source: "
                  f"{'cluster' in src})", flush=True)
        except Exception as e:  # a CompileError names the variant
            failed += 1
            print(f"{name}: FAILED {str(e)[:1500]}", flush=True)
    return 1 if failed else 0


def two_launch_twins(static, variants) -> dict:
    """For each cluster variant, the production TileLang split kernel at the same tile (16-row
    group tile, 64-token steps, 128 threads, 2 stages, same load form, one CTA per SM as the
    cluster kernel asks no more) run with num_splits = C, then its merge launch: the same
    split work, merged the usual way. name -> (adapter, C)."""
    from sparsegen.codegen.tilelang_decode import TileLangSparseDecode

    out = {}
    for cluster, ws in variants:
        cfg = {**TileLangSparseDecode.default_config(static), **TILE, "block_n": BLOCK,
               "warp_specialize": ws, "min_blocks_per_sm": 1}
        out[variant_name(cluster, ws, "twolaunch")] = (TileLangSparseDecode(static, cfg), cluster)
    return out


def probe_case(attend, kernels, twins, batch, seq_len, fraction, gen) -> dict:
    x = decode_inputs(batch, seq_len, fraction, gen)
    k, v, seq_lens, counts, qs, sels = x.k, x.v, x.seq_lens, x.counts, x.qs, x.sels
    count, sel_bytes = x.count, x.sel_bytes
    ref = sparse_decode_reference(qs[0], k, v, sels[0], counts, seq_lens, BLOCK, validate=False)
    base = attend.module.kernel_for(k.device, batch, seq_len)
    row = {"batch": batch, "seq_len": seq_len, "fraction": fraction, "selected_blocks": count,
           "selected_MB": sel_bytes / 1e6, "baseline": f"{base.name} "
           f"{json.dumps(base.config, sort_keys=True)} ({base.num_splits(batch, HKV, count, k.device)} splits)"}
    scale = D ** -0.5 * LOG2E

    def cluster_call(kern, q, i):
        out = torch.empty(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
        kern(q, k, v, i, counts, seq_lens, out, scale)
        return out

    calls = {"baseline": [lambda q=q, i=i: base(q, k, v, i, counts, seq_lens)
                          for q, i in zip(qs, sels)]}
    for name, kern in kernels.items():
        calls[name] = [lambda q=q, i=i, kern=kern: cluster_call(kern, q, i)
                       for q, i in zip(qs, sels)]
    for name, (adapter, c) in twins.items():
        calls[name] = [lambda q=q, i=i, a=adapter, c=c: a(q, k, v, i, counts, seq_lens,
                                                          num_splits=c)
                       for q, i in zip(qs, sels)]
    for name, fns in calls.items():
        try:
            err = rel_err(fns[0](), ref)
            row[f"{name}_err"] = err
            if not err < 1e-2:
                row[f"{name}_note"] = f"WRONG (rel err {err:.3g}); not timed"
                continue
            ms = time_graph_per_call(fns)
            row[f"{name}_ms"] = ms
            row[f"{name}_TBps"] = sel_bytes / ms / 1e9
        except Exception as e:  # a variant that fails is a result, not the end of the run
            row[f"{name}_note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    del x, k, v, calls  # x holds the cache too
    torch.cuda.empty_cache()
    print(json.dumps(row), flush=True)
    return row


def write_markdown(rows, facts, names, path):
    lines = results_header("Decode attention: merge by a thread-block cluster (probe)", facts)
    lines += ["- Hq 32, Hkv 8, D 128, block 64, bf16, contiguous; ms per call of CUDA graphs of "
              "8 calls, medians (TB/s of the selected K+V); outputs checked against the fp32 "
              "torch reference first",
              "- baseline: the attention the emitted seer-attention-r module runs at the shape "
              "(split kernel + merge kernel); clusterC: the C splits of a row are one cluster, "
              "rank 0 merges through distributed shared memory (one launch); twolaunchC: "
              "the production TileLang split kernel at the same tile with C splits, then its "
              "merge launch; tma = warp-specialised TMA loads, cpasync = cp.async",
              "", "| B | len | sel. blocks | " + " | ".join(names) + " |",
              "|" + "---|" * (3 + len(names))]
    for r in rows:
        cells = []
        for n in names:
            if f"{n}_ms" in r:
                cells.append(f"{fmt(r[n + '_ms'], '.4f')} ({r[n + '_TBps']:.2f})")
            else:
                cells.append(r.get(f"{n}_note", "-"))
        lines.append(f"| {r['batch']} | {r['seq_len']} | {r['selected_blocks']} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Baselines: " + "; ".join(f"B{r['batch']}/{r['seq_len']}/{r['fraction']}: "
                                            f"{r['baseline']}" for r in rows)]
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compile-only", action="store_true",
                    help="no GPU: lower and compile every variant for sm_90a")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="time only these (e.g. cluster2_cpasync); default: all")
    ap.add_argument("--out", default=None,
                    help="results stem (default bench/results/<GPU>-decode-cluster-probe)")
    args = ap.parse_args()
    if args.compile_only:
        sys.exit(compile_only())
    require_cuda()
    from sparsegen.codegen.tilelang_build import compile_for_arch, device_arch

    facts = gpu_facts()
    arch = device_arch("cuda")
    kernels = {}
    variants = [(c, ws) for c, ws in VARIANTS
                if args.variants is None or variant_name(c, ws) in args.variants]
    for cluster, ws in variants:
        name = variant_name(cluster, ws)
        try:
            kernels[name] = compile_for_arch(cluster_decode_module(cluster, ws), arch)
        except Exception as e:
            print(f"{name}: compile failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
    static = DecodeStatic(block_size=BLOCK, head_dim=D, group_size=GROUP, dtype="bf16",
                          layout="contiguous", page_size=0)
    attend, _ = emitted_attention(static, ["seer-attention-r"])
    twins = two_launch_twins(static, variants)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for batch, seq_len, fraction in CASES:
        rows.append(probe_case(attend, kernels, twins, batch, seq_len, fraction, gen))
        if os.environ.get("OUT"):  # partial results survive a time limit
            Path(os.environ["OUT"], f"partial-{Path(str(args.out or 'cluster')).name}.json").write_text(
                json.dumps(rows))
    names = ["baseline"] + [variant_name(c, ws, form) for c, ws in variants
                            for form in ("cluster", "twolaunch")]
    stem = args.out or ROOT / "bench" / "results" / f"{facts['gpu_slug']}-decode-cluster-probe"
    save_results(stem, facts, rows, lambda p: write_markdown(rows, facts, names, p))


if __name__ == "__main__":
    main()
