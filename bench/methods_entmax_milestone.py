"""H100 benchmark of the entmax (DashAttention) and milestone (RaaS) rules (issue 6).

    python bench/methods_entmax_milestone.py                    # every part (~6-8 min)
    python bench/methods_entmax_milestone.py --parts decode     # one part: decode, prefill,
                                                                # milestone
    python bench/methods_entmax_milestone.py --quick            # one shape per figure

Every figure checks its outputs against the torch reference before timing (medians of CUDA
events, plain calls and CUDA-graph replays, several input sets rotated):
- entmax decode step (tau kernels + decode kernel with the prior; and the emitted layer's
  whole step, which adds the K/V append and a filling block's summary) vs dense cuDNN SDPA at
  batch 8/16, 32K/128K, at the sparsity the scale gives (scale found for 75 % and 90 %);
  speedup against the ideal 1/(1-s) (target >= 80 %), and the tau solve's share (<= 10 %);
- entmax prefill forward + backward at 75 % sparsity, 32K tokens, vs dense SDPA (flash and
  cuDNN) forward + backward (target >= 2x);
- milestone: KV memory over a 32K-token decode with a 2K budget (flat within one page per
  sequence, while dense grows), then the decode step at 64K of context vs dense (>= 8x).
Hq 32, Hkv 8, D 128, bf16. Writes bench/results/<GPU>-entmax-milestone.{md,json} (and to $OUT).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.baselines import dense_prefill_fwd_bwd, fastest_cudnn_decode  # noqa: E402
from bench.emitted import emitted_attention, tuned_rule_configs  # noqa: E402
from bench.methods_gate_topk import step_fn  # noqa: E402
from bench.timing import (fmt, gpu_facts, note, rel_err, require_cuda, results_header,  # noqa: E402
                          save_results, time_graph, time_graph_per_call, time_plain,
                          GRAPH_CALLS)
from sparsegen.codegen.backend import decode_backend  # noqa: E402
from sparsegen.codegen.decode_api import DecodeStatic  # noqa: E402
from sparsegen.codegen.entmax_kernels import EntmaxDecodeTriton, EntmaxStatic  # noqa: E402
from sparsegen.codegen.entmax_tau import EntmaxTau  # noqa: E402
from sparsegen.codegen.entmax_prefill import EntmaxPrefillTriton  # noqa: E402
from sparsegen.codegen.milestone_kernels import MilestoneScoreTriton, MilestoneStatic  # noqa: E402
from sparsegen.codegen.tilelang_build import device_arch, prewarm  # noqa: E402
from sparsegen.methods.entmax import (EntmaxRule, block_summaries,  # noqa: E402
                                      entmax_prefill,
                                      prefill_selection, select_blocks)
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from sparsegen.methods.milestone import MilestoneDecoder, MilestoneRule  # noqa: E402
from sparsegen.methods.sparse_decode_ref import sparse_decode_reference  # noqa: E402

HQ, HKV, D, BLOCK = 32, 8, 128, 64
G = HQ // HKV
DT = torch.bfloat16
ROTATE = 4
ENTMAX_STATIC = EntmaxStatic(BLOCK, D, G, "bf16")
MILESTONE_PAGE = 16


# ---------------------------------------------------------------------------------------
# entmax decode
# ---------------------------------------------------------------------------------------
def scale_for_sparsity(q, summ, seq, rule, target):
    """Bisect c (log scale) so the torch selection skips `target` of the blocks."""
    lo, hi = 0.05, 400.0
    nb = math.ceil(int(seq[0]) / rule.block_size)
    for _ in range(18):
        c = math.sqrt(lo * hi)
        r = dataclasses.replace(rule, scale=c)
        sel = select_blocks(q, summ, seq, r)
        s = 1 - sel.counts.float().mean().item() / nb
        lo, hi = (c, hi) if s < target else (lo, c)
    return math.sqrt(lo * hi)


def entmax_decode_state(batch, seq_len, target, gen):
    """A random cache of seq_len tokens per sequence, its block summaries (w = 0: means),
    ROTATE query sets and the scale c at which the torch selection skips `target` of the
    blocks: (k, v, seq_lens, summaries, qs, c)."""
    k = torch.randn(batch, seq_len, HKV, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn_like(k)
    seq = torch.full((batch,), seq_len, dtype=torch.int32, device="cuda")
    w0 = torch.zeros(HKV, D, device="cuda")
    summ = torch.cat([block_summaries(k[b:b + 1], w0, BLOCK, torch.float32).to(DT)
                      for b in range(batch)]).contiguous()  # per sequence: bounded temps
    qs = [torch.randn(batch, HQ, D, device="cuda", dtype=DT, generator=gen)
          for _ in range(ROTATE)]
    c = scale_for_sparsity(qs[0], summ, seq, EntmaxRule(block_size=BLOCK), target)
    return k, v, seq, summ, qs, c


# the example spec tuned at each target sparsity (tuning.sparsity), as a user aiming there
# writes it: its emitted module is what the row runs
SPEC_AT_SPARSITY = {0.75: "dash-entmax", 0.9: "dash-entmax-90"}


def entmax_decode_kernels(c, batch, seq_len, target=0.75):
    """The tau solve at scale c and the decode kernel with the prior, at the configs
    the emitted module of the example spec tuned at `target` sparsity runs at this shape
    (its nearest tuned buckets, else the defaults): (tau, att, {kernel: where its config
    came from})."""
    cfg, source = tuned_rule_configs({"entmax_tau": ENTMAX_STATIC,
                                      "entmax_decode": ENTMAX_STATIC},
                                     [SPEC_AT_SPARSITY[target]], batch, seq_len)
    return (EntmaxTau(ENTMAX_STATIC, cfg.get("entmax_tau"), scale=c),
            EntmaxDecodeTriton(ENTMAX_STATIC, cfg.get("entmax_decode")),
            {k: source.get(k, "default") for k in ("entmax_tau", "entmax_decode")})


def entmax_decode_step(tau, att, k, v, seq, summ, lengths):
    """One entmax decode step (tau solve, then attention with the prior) as a function of q."""
    def step(q):
        s = tau(q, summ, seq, lengths)
        return att(q, k, v, s.indices, s.counts, seq, block_bias=s.bias)
    return step


def whole_step_block_mean(tau, att, rule, k, v, summ, qs, gen):
    """The emitted layer's whole decode step, as the gate / topk bench times theirs:
    EntmaxDecoder.step on a KVCache holding k, v (the token's K/V append, the block
    summary when a block fills, the tau solve, the attention with the prior), block_size
    consecutive steps from seq_len - block_size in one CUDA graph, per step. Checked first:
    a step's output against the reference attention over its own selection, the appended
    token included. Returns (ms per step, rel err of the checked step)."""
    from sparsegen.methods.entmax import EntmaxDecoder

    batch, seq_len = k.shape[:2]
    cache = KVCache(batch, HKV, D, seq_len + BLOCK, dtype=k.dtype, device=k.device)
    for b in range(batch):
        cache.extend(b, k[b], v[b])
    dec = EntmaxDecoder(rule, HQ, HKV, D, selector=tau)
    dec._ensure_state(cache)
    dec.summaries[:, :, :summ.shape[2]] = summ
    new = [(torch.randn(batch, HKV, D, device=k.device, dtype=k.dtype, generator=gen),
            torch.randn(batch, HKV, D, device=k.device, dtype=k.dtype, generator=gen)) for _ in qs]
    n = seq_len - BLOCK

    def block(q, kn, vn):  # the gate / topk bench's reset-and-step, which the decoders share
        return step_fn(dec, cache, att, q, kn, vn, None, None, n, steps=BLOCK)

    out = block(qs[0], *new[0])()
    sel = dec.last_selection
    ref = sparse_decode_reference(qs[0], cache.k, cache.v, sel.indices, sel.counts,
                                  cache.seq_lens, BLOCK, block_bias=sel.bias, validate=False)
    err = rel_err(out, ref)
    if not err < 1e-2:
        raise RuntimeError(f"the whole step's output is wrong: rel err {err:.2e}")
    runs = [block(q, kn, vn) for q, (kn, vn) in zip(qs, new)]
    return time_graph(runs) / BLOCK, err


def tau_variants(tau: EntmaxTau) -> dict:
    """The tau solve as the row runs it and its other forms, each at its seed config: the
    two Triton launches at the default config, the TileLang kernel at 256 and 512 threads,
    with the heads' solve split over the warps, and over a cluster (one name per seed)."""
    st, c = tau.static, tau.config
    out = {f"as run ({c['algo']})": tau}
    if c["algo"] == "tilelang":
        out["triton default"] = EntmaxTau(st, None, scale=tau.scale)
    for cfg in EntmaxTau.seed_configs(st):
        if cfg != c:
            cluster = f", cluster {cfg['cluster']}" if cfg["cluster"] > 1 else ""
            split = ", heads split" if cfg.get("head_split") else ""
            out[f"tilelang {32 * cfg['num_warps']} threads{cluster}{split}"] = EntmaxTau(
                st, cfg, scale=tau.scale)
    return out


def prewarm_taus(taus, summ) -> None:
    """Build the TileLang kernels of these tau solvers (for summ's capacity) side by side
    before they are timed: ~10 s each to compile, which one at a time took most of a device
    call's bench stage."""
    jobs = [t.tilelang.render_job(summ.shape[2]) for t in taus if t.tilelang is not None]
    for line in prewarm(jobs, device_arch(summ.device)):
        print(f"prewarm failed (the form's row says why): {line}", flush=True)


def tau_ab(variants, att, k, v, seq, summ, qs, lengths, want, dense_mean):
    """Same steps, same inputs, one tau form after another (each checked first): block mean
    per call and of-ideal for each; `want` is the torch selection of qs[0]."""
    out = {}
    batch = seq.shape[0]
    nb = want.indices.shape[-1]
    for name, tau in variants.items():
        r = out[name] = {"config": tau.config}
        sel = tau(qs[0], summ, seq, lengths)
        r["selection_rows_identical"] = sum(
            sel.blocks(b, h) == want.blocks(b, h) for b in range(batch)
            for h in range(HKV)) / (batch * HKV)
        if r["selection_rows_identical"] < 0.99:
            r["note"] = "selection differs from torch: not timed"
            continue
        # before the timed calls: they overwrite the kernel's persistent outputs
        sparsity = 1 - sel.counts.float().mean().item() / nb
        step = entmax_decode_step(tau, att, k, v, seq, summ, lengths)
        r["step_mean_graph_ms"] = time_graph_per_call([lambda q=q: step(q) for q in qs])
        r["tau_graph_ms"] = time_graph([lambda q=q: tau(q, summ, seq, lengths) for q in qs])
        r["of_ideal_mean"] = dense_mean / r["step_mean_graph_ms"] * (1 - sparsity)
    return out


def bench_entmax_decode(batch, seq_len, target, rows, gen, ab=False):
    row = {"part": "entmax_decode", "batch": batch, "seq_len": seq_len, "target_sparsity": target}
    rows.append(row)
    try:
        k, v, seq, summ, qs, c = entmax_decode_state(batch, seq_len, target, gen)
        rule = EntmaxRule(block_size=BLOCK, scale=c)
        tau, att, row["configs_from"] = entmax_decode_kernels(c, batch, seq_len, target)
        lengths = [seq_len] * batch
        nb = math.ceil(seq_len / BLOCK)
        # check: the kernels' selection vs torch's, and attention vs the fp32 reference
        sel = tau(qs[0], summ, seq, lengths)
        want = select_blocks(qs[0], summ, seq, rule, width=nb)
        same = sum(sel.blocks(b, h) == want.blocks(b, h) for b in range(batch)
                   for h in range(HKV))
        row["scale"] = c
        row["selection_rows_identical"] = same / (batch * HKV)
        row["sparsity"] = 1 - sel.counts.float().mean().item() / nb
        row["ideal_speedup"] = 1 / (1 - row["sparsity"])
        out = att(qs[0], k, v, sel.indices, sel.counts, seq, block_bias=sel.bias)
        ref = sparse_decode_reference(qs[0], k, v, sel.indices, sel.counts, seq, BLOCK,
                                      block_bias=sel.bias, validate=False)
        row["attn_err"] = rel_err(out, ref)
        if not row["attn_err"] < 1e-2:
            row["note"] = "WRONG attention output"
            return

        step = entmax_decode_step(tau, att, k, v, seq, summ, lengths)
        steps = [lambda q=q: step(q) for q in qs]
        solves = [lambda q=q: tau(q, summ, seq, lengths) for q in qs]
        row["step_ms"] = time_plain(steps)
        row["step_graph_ms"] = time_graph(steps)
        row["tau_graph_ms"] = time_graph(solves)
        row["dense_variant"], dense, row["dense_graph_ms"] = fastest_cudnn_decode(
            qs, k, v, time_graph)
        row["dense_ms"] = time_plain(dense)
        row["speedup"] = row["dense_graph_ms"] / row["step_graph_ms"]
        row["of_ideal"] = row["speedup"] / row["ideal_speedup"]
        row["tau_share"] = row["tau_graph_ms"] / row["step_graph_ms"]
        # as a model runs it: one graph holds many calls (its ~12 us launch spread over
        # them); the tau share is what the step loses to the solve (attention alone on the
        # same selections, timed the same way; the attention between steps evicts the
        # summaries from L2 as another layer's would)
        sels = [tau(q, summ, seq, lengths) for q in qs]
        sels = [(s.indices.clone(), s.counts.clone(), s.bias.clone()) for s in sels]
        atts = [lambda q=q, s=s: att(q, k, v, s[0], s[1], seq, block_bias=s[2])
                for q, s in zip(qs, sels)]
        row["step_mean_graph_ms"] = time_graph_per_call(steps)
        row["attn_mean_graph_ms"] = time_graph_per_call(atts)
        row["dense_mean_graph_ms"] = time_graph_per_call(dense)
        row["speedup_mean"] = row["dense_mean_graph_ms"] / row["step_mean_graph_ms"]
        row["of_ideal_mean"] = row["speedup_mean"] / row["ideal_speedup"]
        row["tau_share_mean"] = 1 - row["attn_mean_graph_ms"] / row["step_mean_graph_ms"]
        # the layer's whole step (+ K/V append, + the summary of a filling block)
        row["whole_step_mean_graph_ms"], row["whole_step_err"] = whole_step_block_mean(
            tau, att, rule, k, v, summ, qs, gen)
        row["of_ideal_whole"] = (row["dense_mean_graph_ms"] / row["whole_step_mean_graph_ms"]
                                 / row["ideal_speedup"])
        if ab:
            variants = tau_variants(tau)
            prewarm_taus(variants.values(), summ)
            row["tau_ab"] = tau_ab(variants, att, k, v, seq, summ, qs, lengths, want,
                                   row["dense_mean_graph_ms"])
    except Exception as e:  # a failure is a result, not the end of the run
        note(row, "note", e)
    finally:
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# entmax prefill (training): forward + backward
# ---------------------------------------------------------------------------------------
def prefill_inputs(T, gen, batch=1):
    q = torch.randn(batch, T, HQ, D, device="cuda", dtype=DT, generator=gen)
    k = torch.randn(batch, T, HKV, D, device="cuda", dtype=DT, generator=gen)
    v = torch.randn(batch, T, HKV, D, device="cuda", dtype=DT, generator=gen)
    w = torch.zeros(HKV, D, device="cuda", dtype=torch.float32)
    return [t.requires_grad_() for t in (q, k, v, w)]


def prefill_fwd_bwd(kern, q, k, v, w, rule, do, block_ops="auto"):
    """entmax_prefill through kern, forward and backward of `do`, as a function of nothing."""
    def run():
        out, _ = entmax_prefill(q, k, v, w, rule, attention=kern.attention, block_ops=block_ops)
        out.backward(do)
    return run


def prefill_sparsity(sel) -> float:
    nq = sel.mask.shape[-1]
    causal = nq * (nq + 1) / 2
    return 1 - sel.mask.float().sum((-1, -2)).mean().item() / causal


def check_prefill_2k(kern, gen) -> float:
    """Max rel err of entmax_prefill through kern (bf16) vs the torch path (dense masked
    logits) in fp32 on the same bf16-valued inputs at 2K tokens: output and q/k/v grads."""
    q, k, v, w = prefill_inputs(2048, gen)
    rule = EntmaxRule(block_size=BLOCK, scale=8.0)
    outs = []
    for attention, cast in ((kern.attention, None), (None, torch.float32)):
        leaves = [t.detach().to(cast or t.dtype).requires_grad_() for t in (q, k, v)]
        out, _ = entmax_prefill(*leaves, w.detach().clone().requires_grad_(), rule,
                                attention=attention)
        out.float().square().mean().backward()
        outs.append([out.detach()] + [t.grad for t in leaves])
    return max(rel_err(a, b) for a, b in zip(*outs))


def bench_entmax_prefill(T, target, rows, gen):
    row = {"part": "entmax_prefill", "seq_len": T, "target_sparsity": target}
    rows.append(row)
    try:
        kern, row["kernel"] = prefill_kernel(T)
        row["config"] = kern.config
        row["check_2k_err"] = check_prefill_2k(kern, gen)
        if not row["check_2k_err"] < 3e-2:
            row["note"] = "WRONG prefill vs torch path"
            return
        q, k, v, w = prefill_inputs(T, gen)
        lo, hi = 0.1, 400.0
        with torch.no_grad():
            for _ in range(14):  # scale for the target sparsity
                c = math.sqrt(lo * hi)
                s = prefill_sparsity(prefill_selection(q, k, w,
                                                       EntmaxRule(block_size=BLOCK, scale=c),
                                                       block_ops="auto"))
                lo, hi = (c, hi) if s < target else (lo, c)
            rule = EntmaxRule(block_size=BLOCK, scale=math.sqrt(lo * hi))
            sel = prefill_selection(q, k, w, rule, block_ops="auto")
        row["scale"], row["sparsity"] = rule.scale, prefill_sparsity(sel)
        do = torch.randn(q.shape, device="cuda", dtype=DT, generator=gen)
        ours = prefill_fwd_bwd(kern, q, k, v, w, rule, do)

        def ours_fwd():
            with torch.no_grad():
                entmax_prefill(q, k, v, w, rule, attention=kern.attention)

        def selection_only():
            with torch.no_grad():
                prefill_selection(q, k, w, rule, block_ops="auto")
        row["ours_fwd_bwd_ms"] = time_plain([ours], warmup_ms=200, rep_ms=1000)
        row["ours_fwd_ms"] = time_plain([ours_fwd], warmup_ms=100, rep_ms=500)
        row["selection_fwd_ms"] = time_plain([selection_only], warmup_ms=100, rep_ms=500)
        best = dense_prefill_fwd_bwd(q, k, v, do, row, time_plain)
        row["speedup_vs_best_dense"] = best / row["ours_fwd_bwd_ms"]
    except Exception as e:
        note(row, "note", e)
    finally:
        print(json.dumps(row), flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
# milestone: memory over a long decode, then the step at 64K of context
# ---------------------------------------------------------------------------------------
def milestone_state(batch, prefill, budget, capacity, gen):
    """A paged cache whose page pool is the whole memory (the prefill's pages plus the budget's
    per sequence) and a milestone decoder (Triton scorer) that has prefilled `prefill` random
    tokens: (cache, dec)."""
    P = MILESTONE_PAGE
    rule = MilestoneRule(page_size=P, block_size=P, budget_tokens=budget, refresh_fraction=0.5)
    pool = batch * (math.ceil(prefill / P) + rule.budget_pages)
    cache = KVCache(batch, HKV, D, capacity, dtype=DT, device="cuda", layout="paged",
                    page_size=P, num_pages=pool)
    dec = MilestoneDecoder(rule, HQ, HKV, D,
                           scorer=MilestoneScoreTriton(MilestoneStatic(D, G, "bf16")))
    k = torch.randn(batch, prefill, HKV, D, device="cuda", dtype=DT, generator=gen)
    dec.prefill(cache, k, torch.randn_like(k))
    return cache, dec


def milestone_device_step(dec, cache, attend):
    """The device part of a milestone step (refresh, select, attend) as a function of q."""
    def step(q):
        dec._refresh(q, cache)
        i, c = dec.select(q, cache)
        return attend(q, cache.k, cache.v, i, c, cache.seq_lens, block_table=cache.block_table)
    return step


def milestone_model_step_ms(dec, cache, attend, q, k_new, v_new, pages=8):
    """ms per token of a milestone decode as a model runs it: one CUDA graph of page_size
    decode steps (every sequence opens a page in it and, past the budget, evicts; the fast
    path decides both on the device), replayed `pages` times, the host's record advanced
    after each replay (`replayed`), between two CUDA events (the host's share is in it)."""
    P = dec.rule.page_size
    cache.reserve(P)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # kernels compiled by the eager steps before
        for _ in range(P):
            dec.step(q, k_new, v_new, cache, attend=attend)
    graph.replay()  # the capture advanced the host's record only: the device catches up

    def page():
        cache.reserve(P)
        graph.replay()
        dec.replayed(cache, P)
    page()
    torch.cuda.synchronize()
    start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
    start.record()
    for _ in range(pages):
        page()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (pages * P)


def paged_triton_attention(page_size):
    """The Triton decode kernel's default config over a paged cache of page_size pages."""
    st = DecodeStatic(page_size, D, G, "bf16", "paged", page_size)
    return decode_backend("triton")(st)


def milestone_attention(page_size):
    """The attention the emitted raas-milestone module runs (its nearest tuned bucket on
    this GPU, from tuning_db/) when the example spec matches the bench's shape, else the
    Triton default. Returns (attend, description)."""
    static = DecodeStatic(page_size, D, G, "bf16", "paged", page_size)
    return (emitted_attention(static, ["raas-milestone"])
            or (paged_triton_attention(page_size), "triton default"))


def prefill_kernel(T):
    """The token-level prefill kernel at the config the emitted dash-entmax module runs for
    one T-token prompt (its nearest tuned bucket on this GPU) when the spec's statics are
    the bench's, else the default. Returns (kernel, description)."""
    cfg, _ = tuned_rule_configs({"entmax_prefill": ENTMAX_STATIC}, ["dash-entmax"], 1, T)
    if "entmax_prefill" not in cfg:
        return EntmaxPrefillTriton(ENTMAX_STATIC), "default config"
    return (EntmaxPrefillTriton(ENTMAX_STATIC, cfg["entmax_prefill"]),
            "emitted dash-entmax module (tuned bucket)")


def bench_milestone(batch, prefill, budget, mem_tokens, ctx_tokens, rows, gen):
    row = {"part": "milestone", "batch": batch, "prefill": prefill, "budget_tokens": budget,
           "memory_decode_tokens": mem_tokens, "context": ctx_tokens}
    rows.append(row)
    try:
        P = MILESTONE_PAGE
        cache, dec = milestone_state(batch, prefill, budget, ctx_tokens + 8192, gen)
        attend, row["attention"] = milestone_attention(P)
        page_bytes = P * HKV * D * 2 * 2
        trace, t0 = [], time.time()
        n_steps = ctx_tokens - prefill
        for i in range(n_steps):
            q = torch.randn(batch, HQ, D, device="cuda", dtype=DT, generator=gen)
            kv = torch.randn(2, batch, HKV, D, device="cuda", dtype=DT, generator=gen)
            out = dec.step(q, kv[0], kv[1], cache, attend=attend)
            if (i + 1) % 1024 == 0 and i < mem_tokens:
                torch.cuda.synchronize()
                trace.append({"decoded": i + 1, "pages_in_use": cache.pages_in_use(),
                              "kv_MB_in_use": cache.pages_in_use() * page_bytes / 1e6,
                              "dense_kv_MB": batch * (prefill + i + 1) * HKV * D * 4 / 1e6,
                              "allocated_MB": torch.cuda.memory_allocated() / 1e6})
        torch.cuda.synchronize()
        row["decode_wall_s"] = time.time() - t0
        row["evictions"] = dec.num_evictions
        row["memory_trace"] = trace
        late = [t["pages_in_use"] for t in trace if t["decoded"] >= budget + P]
        row["pages_in_use_spread"] = (max(late) - min(late)) if late else None
        row["pages_bound"] = cache.k.shape[0]  # the page pool
        row["allocated_MB_spread"] = (max(t["allocated_MB"] for t in trace)
                                      - min(t["allocated_MB"] for t in trace)) if trace else None
        # check the last step's output against the reference on the same selection
        idx, counts = dec.last_selection
        ref = sparse_decode_reference(q, cache.k, cache.v, idx, counts, cache.seq_lens, P,
                                      block_table=cache.block_table, validate=True)
        row["attn_err"] = rel_err(out, ref)
        row["selected_tokens"] = int(counts.float().mean().item()) * P
        # the step at ctx_tokens of context: device part (graph) and the whole step (plain)
        qs = [torch.randn(batch, HQ, D, device="cuda", dtype=DT, generator=gen)
              for _ in range(ROTATE)]
        device_step = milestone_device_step(dec, cache, attend)
        calls = [functools.partial(device_step, q) for q in qs]
        row["device_step_ms"] = time_plain(calls)
        row["device_step_graph_ms"] = time_graph(calls)
        kv = torch.randn(2, batch, HKV, D, device="cuda", dtype=DT, generator=gen)
        if hasattr(attend, "module"):
            adapter = attend.module.kernel_for(q.device, batch, cache.block_table.shape[1] * P)
            row["attention"] += f": {adapter.name} {adapter.config}"
        row["full_step_ms"] = time_plain(
            [lambda q=q: dec.step(q, kv[0], kv[1], cache, attend=attend) for q in qs],
            warmup_ms=20, rep_ms=200)
        try:  # a failure here keeps the row's other figures
            row["model_step_ms"] = milestone_model_step_ms(dec, cache, attend, qs[0], kv[0],
                                                           kv[1])
        except Exception as e:
            note(row, "model_step_note", e)
        del cache, device_step, calls  # free the paged pool before the dense cache
        torch.cuda.empty_cache()
        kd = torch.randn(batch, ctx_tokens, HKV, D, device="cuda", dtype=DT, generator=gen)
        vd = torch.randn_like(kd)
        row["dense_variant"], dense, row["dense_graph_ms"] = fastest_cudnn_decode(
            qs, kd, vd, time_graph)
        row["dense_ms"] = time_plain(dense)
        row["speedup_graph"] = row["dense_graph_ms"] / row["device_step_graph_ms"]
        row["speedup_plain_full_step"] = row["dense_ms"] / row["full_step_ms"]
        if "model_step_ms" in row:
            row["speedup_model_step"] = row["dense_graph_ms"] / row["model_step_ms"]
    except Exception as e:
        note(row, "note", e)
    finally:
        print(json.dumps({k: v for k, v in row.items() if k != "memory_trace"}), flush=True)
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------
def write_markdown(rows, facts, path):
    L = [*results_header("entmax and milestone rules", facts),
         f"- Hq {HQ}, Hkv {HKV}, D {D}, bf16; medians in ms; graph = CUDA-graph replay", ""]
    dec = [r for r in rows if r["part"] == "entmax_decode"]
    if dec:
        L += ["## entmax decode step vs dense cuDNN (block 64)", "",
              "| B | len | sparsity | ideal | step ms (graph) | tau ms (graph) | tau share | "
              "cuDNN ms (graph) | speedup | of ideal (>= 0.8) | sel. rows = torch | err | note |",
              "|" + "---|" * 13]
        for r in dec:
            L.append(f"| {r['batch']} | {r['seq_len']} | {fmt(r.get('sparsity'))} | "
                     f"{fmt(r.get('ideal_speedup'), '.2f')} | {fmt(r.get('step_ms'), '.4f')} "
                     f"({fmt(r.get('step_graph_ms'), '.4f')}) | {fmt(r.get('tau_graph_ms'), '.4f')} | "
                     f"{fmt(r.get('tau_share'))} | {fmt(r.get('dense_ms'), '.4f')} "
                     f"({fmt(r.get('dense_graph_ms'), '.4f')}) | {fmt(r.get('speedup'), '.2f')} | "
                     f"{fmt(r.get('of_ideal'), '.2f')} | {fmt(r.get('selection_rows_identical'))} | "
                     f"{fmt(r.get('attn_err'), '.1e')} | {r.get('note', '')} |")
        froms = sorted({f"{k} {v}" for r in dec for k, v in r.get("configs_from", {}).items()})
        L += ["", "Configs: the emitted module's of the example spec tuned at the row's target "
              "sparsity (tuning.sparsity: 75 % dash-entmax, 90 % dash-entmax-90), its nearest "
              "tuned bucket (" + "; ".join(froms) + ")"]
        L += ["", f"As a model runs it (one CUDA graph holds many calls: ms per call of graphs "
              f"of {GRAPH_CALLS} calls; tau share = 1 - attention alone on the same selections "
              "/ step, so it is the time the step loses to the solve; whole step = the "
              "emitted layer's step, which adds the K/V append and, once a block, its summary: "
              f"{BLOCK} consecutive steps in one graph, per step):", "",
              "| B | len | sparsity | step ms | attention alone ms | tau share | cuDNN ms | "
              "speedup | of ideal (>= 0.8) | whole step ms | of ideal, whole step |",
              "|" + "---|" * 11]
        for r in dec:
            if "step_mean_graph_ms" not in r:
                continue
            L.append(f"| {r['batch']} | {r['seq_len']} | {fmt(r.get('sparsity'))} | "
                     f"{r['step_mean_graph_ms']:.4f} | {r['attn_mean_graph_ms']:.4f} | "
                     f"{r['tau_share_mean']:.3f} | {r['dense_mean_graph_ms']:.4f} | "
                     f"{r['speedup_mean']:.2f} | {r['of_ideal_mean']:.2f} | "
                     f"{fmt(r.get('whole_step_mean_graph_ms'), '.4f')} | "
                     f"{fmt(r.get('of_ideal_whole'), '.2f')} |")
        ab = [r for r in dec if r.get("tau_ab")]
        if ab:
            L += ["", "Tau forms side by side (`--tau-ab`: the same steps and inputs, the "
                  "attention as above, one solve after another; block mean per call of graphs "
                  f"of {GRAPH_CALLS} calls; of ideal against the dense time above):", "",
                  "| B | len | target | tau form | config | sel. rows = torch | tau ms (graph) | "
                  "step ms | of ideal |", "|" + "---|" * 9]
            for r in ab:
                for name, t in r["tau_ab"].items():
                    L.append(f"| {r['batch']} | {r['seq_len']} | {r['target_sparsity']} | "
                             f"{name} | `{t['config']}` | {fmt(t.get('selection_rows_identical'))} | "
                             f"{fmt(t.get('tau_graph_ms'), '.4f')} | "
                             f"{fmt(t.get('step_mean_graph_ms'), '.4f')} | "
                             f"{fmt(t.get('of_ideal_mean'), '.2f')} {t.get('note', '')} |")
        L.append("")
    pre = [r for r in rows if r["part"] == "entmax_prefill"]
    if pre:
        L += ["## entmax prefill forward + backward (B 1, block 64)", "",
              *[f"- {r['seq_len']} tokens: {r.get('kernel', '-')}, config `{r.get('config')}`"
                for r in pre], "",
              "| T | sparsity | ours fwd+bwd ms | ours fwd ms | selection fwd ms | flash fwd+bwd | "
              "cuDNN fwd+bwd | speedup vs best dense (>= 2) | check err (2K) | note |",
              "|" + "---|" * 10]
        for r in pre:
            L.append(f"| {r['seq_len']} | {fmt(r.get('sparsity'))} | {fmt(r.get('ours_fwd_bwd_ms'))} | "
                     f"{fmt(r.get('ours_fwd_ms'))} | {fmt(r.get('selection_fwd_ms'))} | "
                     f"{fmt(r.get('flash_fwd_bwd_ms'))} | {fmt(r.get('cudnn_fwd_bwd_ms'))} | "
                     f"{fmt(r.get('speedup_vs_best_dense'), '.2f')} | {fmt(r.get('check_2k_err'), '.1e')} | "
                     f"{r.get('note', '')} |")
        L.append("")
    ms = [r for r in rows if r["part"] == "milestone"]
    for r in ms:
        L += [f"## milestone: B {r['batch']}, prefill {r['prefill']}, budget {r['budget_tokens']} "
              f"tokens, page 16", "", f"- attention: {r.get('attention', '-')}",
              f"- decode to {r['context']} tokens took {fmt(r.get('decode_wall_s'), '.1f')} s "
              f"of wall time, {r.get('evictions')} evictions; pool = {r.get('pages_bound')} pages "
              f"(prefill + budget, the budget's taken at prefill) and never more",
              f"- pages in use after the budget filled: spread {r.get('pages_in_use_spread')} "
              f"(target <= {r['batch']}, one page per sequence); torch.cuda.memory_allocated "
              f"spread {fmt(r.get('allocated_MB_spread'), '.2f')} MB",
              f"- step at {r['context']} of context: device part {fmt(r.get('device_step_ms'), '.4f')} ms "
              f"(graph {fmt(r.get('device_step_graph_ms'), '.4f')}), whole step incl. append/evict "
              f"{fmt(r.get('full_step_ms'), '.4f')} ms; dense cuDNN {fmt(r.get('dense_ms'), '.4f')} "
              f"(graph {fmt(r.get('dense_graph_ms'), '.4f')}); speedup graph "
              f"{fmt(r.get('speedup_graph'), '.1f')}x (target >= 8), plain whole step "
              f"{fmt(r.get('speedup_plain_full_step'), '.1f')}x; as a model runs it (one CUDA "
              f"graph of 16 whole steps, page openings and evictions in it, replayed) "
              f"{fmt(r.get('model_step_ms'), '.4f')} ms a token, "
              f"{fmt(r.get('speedup_model_step'), '.1f')}x dense's graph; attention err "
              f"{fmt(r.get('attn_err'), '.1e')} {r.get('note', '')}", "",
              "| decoded | pages in use | KV MB in use | dense KV MB | allocated MB |",
              "|---|---|---|---|---|"]
        for t in r.get("memory_trace", []):
            L.append(f"| {t['decoded']} | {t['pages_in_use']} | {t['kv_MB_in_use']:.1f} | "
                     f"{t['dense_kv_MB']:.1f} | {t['allocated_MB']:.1f} |")
        L.append("")
    path.write_text("\n".join(L) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["decode", "prefill", "milestone"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results stem")
    ap.add_argument("--tau-ab", action="store_true",
                    help="also time each decode row with the other tau forms (Triton / TileLang)")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="BxN",
                    help="decode shapes, e.g. 8x32768 16x131072 (default: the four targets)")
    args = ap.parse_args()
    require_cuda()
    facts = gpu_facts()
    print(json.dumps(facts), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    if "decode" in args.parts:
        shapes = [(8, 32768)] if args.quick else [(8, 32768), (16, 32768), (8, 131072),
                                                   (16, 131072)]
        if args.shapes:
            shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes]
        for batch, n in shapes:
            for target in ((0.75,) if args.quick else (0.75, 0.9)):
                bench_entmax_decode(batch, n, target, rows, gen, ab=args.tau_ab)
    if "prefill" in args.parts:
        bench_entmax_prefill(32768, 0.75, rows, gen)
    if "milestone" in args.parts:
        bench_milestone(8, 1024, 2048, 32768, 16384 if args.quick else 65536, rows, gen)
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-entmax-milestone")
    save_results(stem, facts, rows, lambda path: write_markdown(rows, facts, path))

if __name__ == "__main__":
    main()
