"""H100 benchmark of gate self-distillation (issue 5, item 2).

    python bench/gate_distill.py            # both parts
    python bench/gate_distill.py --quick    # target at 8K; memory at 4K-16K

(a) The distillation target kernel (Triton) vs the plain-torch reference at 4K, 8K and 16K
    tokens (B 1, Hq 32, Hkv 8, D 128, block 64, bf16): outputs checked against the reference
    first (whole sequence and a row range), then medians of plain calls (both) and CUDA-graph
    replays (kernel), rotating over fresh random input sets; also the target computed in the
    row chunks the loss uses (default chunk), and each path's peak extra memory.
    Target: kernel >= 5x faster than the reference at 8K.
(b) Peak CUDA memory of one forward + backward of one layer's distillation loss: the row-
    chunked `gate_distill_loss` (target kernel) beside the whole-sequence path
    (gate_kl_loss(gate(...), distill_target(...))) where it fits, at 4K-64K tokens, for a
    random AttnGate of examples/specs/seer-attention-r.yaml and random post-RoPE q/k. Peak =
    torch.cuda.max_memory_allocated minus what was allocated before (the inputs). Linear
    memory shows as a constant MB per 1K tokens added (and a ratio -> 2 per doubling); the
    whole-sequence path's grows with the length (ratio -> 4). Both losses are compared first.
Writes bench/results/<GPU>-gate-distill.{md,json} (and $OUT) with the header of
bench/timing.py.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.emitted import tuned_rule_configs
from bench.timing import (fmt, gpu_facts, note, require_cuda, results_header, save_results,
                          time_graph, time_plain)
from sparsegen.codegen.distill_kernels import (
    DistillStatic,
    TritonDistillTarget,
    flops,
)
from sparsegen.codegen.triton_kernel import dtype_name
from sparsegen.methods.distill import (
    default_chunk_rows,
    distill_target,
    distill_target_reference,
    gate_distill_loss,
    gate_kl_loss,
)
from sparsegen.methods.gate import AttnGate
from sparsegen.spec import load_spec

HQ, HKV, D, BS = 32, 8, 128, 64
G = HQ // HKV
DT = torch.bfloat16
DEVICE = "cuda"
SPEC = ROOT / "examples" / "specs" / "seer-attention-r.yaml"
ROTATE = 2           # input sets per timing (a 8K set is 80 MB: more than the L2)
TARGET_TOL = 2e-2    # max |kernel - reference| of target probabilities, bf16 inputs
LOSS_TOL = 1e-3      # relative difference of the chunked and whole-sequence losses
MB = 1e6


def qk(S, gen, batch=1, scale=1.0):
    return (torch.randn(batch, S, HQ, D, device=DEVICE, generator=gen).mul_(scale).to(DT),
            torch.randn(batch, S, HKV, D, device=DEVICE, generator=gen).to(DT))


def peak_extra_mb(fn, *args):
    """(peak memory fn(*args) allocates beyond what is allocated when it starts, in MB, its
    result)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = fn(*args)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / MB, result


# --- (a) the target kernel vs the reference --------------------------------------------------
def chunked_target(kern, q, k):
    """The whole target the way the loss walks it: default-size row chunks, one at a time."""
    S = q.shape[1]
    chunk = default_chunk_rows(q.shape[0], HKV, S, BS)
    for r0 in range(0, S, chunk):
        kern(q, k, None, r0, min(chunk, S - r0))


STATIC = DistillStatic(BS, D, G, dtype_name(DT))


def distill_config(batch, seq_len, row):
    """The target kernel's config `sparsegen distill` runs at this shape (the seer spec's
    tuned bucket, else None: the default), noted in row."""
    configs, source = tuned_rule_configs({"distill_target": STATIC}, ("seer-attention-r",),
                                         batch, seq_len)
    config = configs.get("distill_target")
    row["config"] = config or TritonDistillTarget.default_config(STATIC)
    row["config_source"] = source.get("distill_target", "default")
    return config


def bench_target(seq_lens, gen, rows, batch=1):
    for S in seq_lens:
        row = {"part": "target", "seq_len": S, "batch": batch, "block_size": BS,
               "chunk_rows": default_chunk_rows(batch, HKV, S, BS)}
        try:
            kern = TritonDistillTarget(STATIC, distill_config(batch, S, row))
            sets = [qk(S, gen, batch, scale=2.0) for _ in range(ROTATE)]
            q, k = sets[0]
            got, want = kern(q, k), distill_target_reference(q, k, BS)
            err = (got - want).abs().max().item()
            r0, n = S // 2 + 37, min(1000, S // 2 - 37)    # a range off every tile boundary
            part = kern(q, k, None, r0, n)
            err = max(err, (part - want[:, :, r0:r0 + n, :part.shape[-1]]).abs().max().item())
            sums = got.sum(-1)[:, :, BS:]
            row["max_abs_err"] = err
            row["row_sum_err"] = (sums - 1).abs().max().item()
            row["ok"] = bool(err < TARGET_TOL and row["row_sum_err"] < 1e-3)
            row["output_MB"] = got.numel() * 4 / MB
            del got, want, part, sums
            if not row["ok"]:
                raise RuntimeError(f"kernel differs from the reference: max abs err {err:.3g}")
            row["kernel_peak_extra_MB"] = peak_extra_mb(kern, q, k)[0]
            row["chunked_peak_extra_MB"] = peak_extra_mb(chunked_target, kern, q, k)[0]
            row["torch_peak_extra_MB"] = peak_extra_mb(distill_target_reference, q, k, BS)[0]
            row["kernel_ms"] = time_plain([lambda a=a, b=b: kern(a, b) for a, b in sets],
                                          rep_ms=500)
            try:
                row["kernel_graph_ms"] = time_graph([lambda a=a, b=b: kern(a, b)
                                                     for a, b in sets], rep_ms=500)
            except Exception as e:  # noqa: BLE001 - the plain timing still stands
                note(row, "graph_note", e)
            row["chunked_ms"] = time_plain([lambda a=a, b=b: chunked_target(kern, a, b)
                                            for a, b in sets], rep_ms=500)
            row["torch_ms"] = time_plain([lambda a=a, b=b: distill_target_reference(a, b, BS)
                                          for a, b in sets], rep_ms=1000)
            row["speedup"] = row["torch_ms"] / row["kernel_ms"]
            row["kernel_TFLOPs"] = flops(batch, S, HQ, D) / row["kernel_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 - one failed length must not stop the others
            note(row, "target_note", e)
        sets = q = k = None
        torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)


# --- (b) memory of the distillation loss, forward + backward ---------------------------------
def make_gate():
    gate = AttnGate.from_spec(load_spec(SPEC)).to(DEVICE)
    if (gate.num_q_heads, gate.num_kv_heads, gate.head_dim, gate.block_size) != (HQ, HKV, D, BS):
        raise SystemExit(f"{SPEC} no longer has Hq {HQ}, Hkv {HKV}, D {D}, block {BS}")
    return gate


def chunked_step(gate, inputs, config=None):
    gate.zero_grad(set_to_none=True)
    loss = gate_distill_loss(gate, *inputs, impl="triton", config=config)
    loss.backward()
    return loss.detach()


def whole_step(gate, inputs, config=None):
    gate.zero_grad(set_to_none=True)
    qn, kn, qp, kp = inputs
    loss = gate_kl_loss(gate(qn, kn), distill_target(qp, kp, BS, impl="triton", config=config))
    loss.backward()
    return loss.detach()


def bench_memory(seq_lens, gen, rows, batch=1):
    gate = make_gate()
    prev = None
    for S in seq_lens:
        row = {"part": "memory", "seq_len": S, "batch": batch,
               "chunk_rows": default_chunk_rows(batch, HKV, S, BS)}
        inputs = None
        try:
            config = distill_config(batch, S, row)
            inputs = (*qk(S, gen, batch), *qk(S, gen, batch, scale=2.0))   # pre-, post-RoPE
            row["inputs_MB"] = sum(t.numel() * t.element_size() for t in inputs) / MB
            out = {}
            row["chunked_peak_MB"], out["chunked"] = peak_extra_mb(chunked_step, gate, inputs, config)
            try:
                row["whole_peak_MB"], out["whole"] = peak_extra_mb(whole_step, gate, inputs, config)
            except torch.cuda.OutOfMemoryError:
                row["whole_note"] = "out of memory"
            gate.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            if "whole" in out:
                a, b = out["chunked"].item(), out["whole"].item()
                row["loss_rel_diff"] = abs(a - b) / max(abs(b), 1e-30)
                row["ok"] = bool(row["loss_rel_diff"] < LOSS_TOL)
                if not row["ok"]:
                    raise RuntimeError(f"chunked loss {a} != whole-sequence loss {b}")
            row["loss"] = out["chunked"].item()
            k_tokens = S / 1024
            for key in ("chunked", "whole"):
                peak = row.get(f"{key}_peak_MB")
                if peak is None:
                    continue
                row[f"{key}_MB_per_1K"] = peak / k_tokens
                if prev is not None and prev.get(f"{key}_peak_MB") is not None:
                    before = prev[f"{key}_peak_MB"]
                    row[f"{key}_ratio"] = peak / before
                    # added MB per added 1K tokens: constant for linear memory
                    row[f"{key}_MB_per_added_1K"] = ((peak - before)
                                                     / ((S - prev["seq_len"]) / 1024))
            sets = [inputs] + [(*qk(S, gen, batch), *qk(S, gen, batch, scale=2.0))
                               for _ in range(ROTATE - 1)]
            row["chunked_fwd_bwd_ms"] = time_plain(
                [lambda x=x: chunked_step(gate, x, config) for x in sets], rep_ms=300)
            if "whole_peak_MB" in row:
                row["whole_fwd_bwd_ms"] = time_plain(
                    [lambda x=x: whole_step(gate, x, config) for x in sets], rep_ms=300)
            sets = None
        except Exception as e:  # noqa: BLE001 - one failed length must not stop the others
            note(row, "memory_note", e)
        inputs = None
        gate.zero_grad(set_to_none=True)
        torch.cuda.empty_cache()
        rows.append(row)
        prev = row
        print(json.dumps(row), flush=True)


# --- report ----------------------------------------------------------------------------------
def write_markdown(rows, facts, path):
    lines = [*results_header("Gate self-distillation", facts),
             (f"- B 1, Hq {HQ}, Hkv {HKV}, D {D}, block {BS}, bf16; medians in ms; `graph` = "
              "CUDA-graph replay; every output checked against the plain-torch reference "
              "before timing"), ""]
    target = [r for r in rows if r["part"] == "target"]
    if target:
        lines += ["## Distillation target: Triton kernel vs plain-torch reference", "",
                  ("Target: kernel >= 5x faster than the reference at 8K. `chunked` = the "
                   "same kernel over the loss's default row chunks (rows per chunk in "
                   "brackets)."), "",
                  ("| len | kernel ms (graph) | chunked ms [rows] | torch ms | speedup | "
                   "kernel TFLOP/s | extra MB: kernel (output) / chunked / torch | "
                   "max abs err | ok |"),
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in target:
            lines.append(
                f"| {r['seq_len']} | {fmt(r.get('kernel_ms'))} "
                f"({fmt(r.get('kernel_graph_ms'))}) | {fmt(r.get('chunked_ms'))} "
                f"[{r['chunk_rows']}] | {fmt(r.get('torch_ms'))} | "
                f"{fmt(r.get('speedup'), '.1f')}x | {fmt(r.get('kernel_TFLOPs'), '.0f')} | "
                f"{fmt(r.get('kernel_peak_extra_MB'), '.1f')} ({fmt(r.get('output_MB'), '.1f')})"
                f" / {fmt(r.get('chunked_peak_extra_MB'), '.1f')} / "
                f"{fmt(r.get('torch_peak_extra_MB'), '.1f')} | {fmt(r.get('max_abs_err'), '.1e')}"
                f" | {r.get('ok')} {r.get('target_note', '')} {r.get('graph_note', '')} |")
        lines += ["", "Kernel config at each length (what `sparsegen distill` runs there: the "
                  "nearest tuned bucket of examples/specs/seer-attention-r.yaml, else the "
                  "default): " + "; ".join(f"{r['seq_len']}: {r.get('config')} "
                                           f"({r.get('config_source')})" for r in target), ""]
    mem = [r for r in rows if r["part"] == "memory"]
    if mem:
        lines += ["## Peak memory of one layer's loss, forward + backward", "",
                  (f"Random AttnGate of `{SPEC.relative_to(ROOT)}`; peak = max allocated "
                   "minus the inputs (pre- and post-RoPE q/k). Linear memory: `added MB / 1K` "
                   "constant and the ratio per doubling -> 2; the whole-sequence path holds "
                   "[S, S / 64] target, logits and gradients per KV head (ratio -> 4)."), "",
                  ("| len | chunk rows | inputs MB | chunked peak MB | MB / 1K tok | added MB "
                   "/ 1K | ratio | whole peak MB | MB / 1K tok | ratio | chunked / whole "
                   "fwd+bwd ms | loss rel diff |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mem:
            whole = fmt(r.get("whole_peak_MB"), ".0f") if "whole_peak_MB" in r else \
                r.get("whole_note", "-")
            lines.append(
                f"| {r['seq_len']} | {r['chunk_rows']} | {fmt(r.get('inputs_MB'), '.0f')} | "
                f"{fmt(r.get('chunked_peak_MB'), '.0f')} | "
                f"{fmt(r.get('chunked_MB_per_1K'), '.1f')} | "
                f"{fmt(r.get('chunked_MB_per_added_1K'), '.1f')} | "
                f"{fmt(r.get('chunked_ratio'), '.2f')} | {whole} | "
                f"{fmt(r.get('whole_MB_per_1K'), '.1f')} | {fmt(r.get('whole_ratio'), '.2f')} | "
                f"{fmt(r.get('chunked_fwd_bwd_ms'), '.1f')} / "
                f"{fmt(r.get('whole_fwd_bwd_ms'), '.1f')} | "
                f"{fmt(r.get('loss_rel_diff'), '.1e')} {r.get('memory_note', '')} |")
    path.write_text("\n".join(lines) + "\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["target", "memory"],
                    choices=["target", "memory"])
    ap.add_argument("--target-len", nargs="+", type=int, default=[4096, 8192, 16384])
    ap.add_argument("--memory-len", nargs="+", type=int,
                    default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--quick", action="store_true", help="target at 8K; memory at 4K-16K")
    ap.add_argument("--out", default=None, help="results stem")
    args = ap.parse_args()
    if args.quick:
        args.target_len, args.memory_len = [8192], [4096, 8192, 16384]
    require_cuda()
    facts = gpu_facts()
    print(json.dumps(facts), flush=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    if "target" in args.parts:
        bench_target(args.target_len, gen, rows)
    if "memory" in args.parts:
        bench_memory(args.memory_len, gen, rows)
    stem = Path(args.out) if args.out else ROOT / "bench" / "results" / (
        f"{facts['gpu_slug']}-gate-distill")
    save_results(stem, facts, rows, lambda path: write_markdown(rows, facts, path))


if __name__ == "__main__":
    main()
