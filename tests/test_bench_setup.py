"""The GPU benches time what the emitted modules run: their rows must share the kernel statics
of the example specs whose tuned configs they take (bench/emitted.py), or they would silently
fall back to default configs. CPU only (no kernel runs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsegen.codegen.decode_api import DecodeStatic
from sparsegen.codegen.rule_kernels import rule_kernels
from sparsegen.plan import make_plan
from sparsegen.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "examples" / "specs"


def _statics(spec) -> dict:
    return {name: static for name, _cls, static in rule_kernels(spec)}


@pytest.mark.parametrize("row,example,kernels", [
    ("gate", "seer-attention-r", ("gate_step", "gate_score", "block_select")),
    ("nsa-mean-shared-b64", "nsa-topk", ("quest_meta", "quest_score", "block_select")),
    ("quest-ub-per-head-b16", "quest-topk", ("block_select",)),
    ("quest-ub-per-head-b64", "quest-topk-b64", ("quest_meta", "quest_score", "block_select")),
])
def test_step_bench_rows_share_the_examples_statics(row, example, kernels):
    from bench import methods_gate_topk as gt

    _, rule, bs, topk = {r[0]: r for r in gt.RULES}[row]
    assert example in gt.TUNED_EXAMPLES
    ours = _statics(gt.bench_spec(rule, bs, topk, 131072, 0.9))
    theirs = _statics(load_spec(SPECS / f"{example}.yaml"))
    for name in kernels:
        assert ours[name] == theirs[name], name


def test_bench_attention_statics_are_an_examples():
    """The block-64 rows attend through the seer spec's tuned attention; the entmax bench's
    prefill statics are the dash spec's."""
    from bench import methods_entmax_milestone as em
    from bench import methods_gate_topk as gt

    seer = make_plan(load_spec(SPECS / "seer-attention-r.yaml")).kernels[0].static
    assert DecodeStatic(64, gt.D, gt.G, "bf16", "contiguous", 0) == seer
    dash = _statics(load_spec(SPECS / "dash-entmax.yaml"))
    assert dash["entmax_prefill"] == em.ENTMAX_STATIC


@pytest.mark.parametrize("row", ["gate", "quest-ub-per-head-b16"])
def test_step_bench_select_ab_swaps_only_block_select(row):
    """The step bench's same-run A/B: within block_select_config the decoder's kernels are
    rebuilt with the Triton select (the other rule kernels at their configs), and the TileLang
    ones are back after."""
    import torch

    from bench import methods_gate_topk as gt
    from bench.block_select_probe import triton_only
    from sparsegen.methods.decode_step import GateDecoder, TopkDecoder
    from sparsegen.methods.gate import AttnGate
    from sparsegen.methods.kv_cache import KVCache

    _, rule, bs, topk = {r[0]: r for r in gt.RULES}[row]
    spec = gt.bench_spec(rule, bs, topk, 1024, 0.9)
    cache = KVCache(1, gt.HKV, gt.D, 1024, dtype=torch.float32, device="cpu")
    others = {"gate_score": {"block_j": 8, "tiles": 4, "num_stages": 2, "num_warps": 2}}
    if rule == "gate":
        dec = GateDecoder.from_spec(spec, AttnGate.from_spec(spec), 1, 1024, device="cpu",
                                    impl="triton", kernel_configs=others)
    else:
        dec = TopkDecoder.from_spec(spec, cache, impl="triton", kernel_configs=others)
    before = gt.block_select_in_use(dec, cache)
    assert before["algo"] == "tilelang"
    with gt.block_select_config(dec, triton_only(before)):
        assert gt.block_select_in_use(dec, cache) == triton_only(before)
        assert dec._kernel_configs["gate_score"] == others["gate_score"]
    assert gt.block_select_in_use(dec, cache) == before
    assert dec._kernel_configs == others


def test_tau_probe_forms_keep_and_drop_by_name():
    """The TileLang tau probe's --forms: a variant is kept when its name holds a form and no
    '!form', and the Triton reference always (what a short device call times)."""
    from bench.entmax_tau_tilelang_probe import variants

    names = [v[0] for v in variants(["bj64 s3 w8", "cut", "!cluster"])]
    assert names[0] == "triton default"
    assert "tilelang bj64 s3 w8" in names and "tilelang bj64 s3 w8 split" in names
    assert "  cut: no Halley steps" in names
    assert not any("cluster" in n or "bj128" in n for n in names)
    assert len(variants(None)) > len(names)
    assert [v[0] for v in variants(["no such form"])] == ["triton default"]


@pytest.mark.parametrize("under_out", [True, False])
def test_results_copied_to_out_only_from_outside_it(tmp_path, monkeypatch, under_out):
    """save_results copies a results file pair into $OUT (what the device tool brings back,
    8 files a call) only when it was written elsewhere: a pair already under $OUT, copied
    again to $OUT's top, spent two of the 8 (session 17 lost a tuning_db that way)."""
    from bench.timing import save_results

    out = tmp_path / "out"
    (out / "stage").mkdir(parents=True)
    monkeypatch.setenv("OUT", str(out))
    stem = (out / "stage" if under_out else tmp_path) / "H100-x"
    save_results(stem, {"gpu": "x"}, [{"a": 1}], lambda p: p.write_text("| a |\n"))
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written == (["stage/H100-x.json", "stage/H100-x.md"] if under_out
                       else ["H100-x.json", "H100-x.md"])


ROOT = Path(__file__).resolve().parents[1]
CPU_SCRIPTS = {"select_compile_probe.py", "tuned_vs_default.py"}   # run with no GPU
SCRIPT_ARGS = {"select_ab.py": ["--rev", "HEAD"]}                  # its one required option


def test_gpu_benches_without_a_gpu_stop_with_one_line():
    """Every runnable GPU bench, started where there is no CUDA device, exits 1 with a line
    naming itself, not a traceback (and so it also imports cleanly on the CPU)."""
    scripts = sorted(p for p in (ROOT / "bench").glob("*.py")
                     if 'if __name__ == "__main__"' in p.read_text() and p.name not in CPU_SCRIPTS)
    assert len(scripts) >= 10
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OUT": ""}
    procs = {p.name: subprocess.Popen([sys.executable, str(p), *SCRIPT_ARGS.get(p.name, [])],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
             for p in scripts}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, (name, out[-500:], err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert err.strip().splitlines()[-1].startswith(f"bench/{name} needs a CUDA GPU"), err


def test_cluster_probe_gather_buffers_alias_nothing():
    """bench/decode_cluster_probe.py: the shared buffers that other ranks of the cluster write
    into (rank 0's partial gather) must not share bytes with any other buffer. TileLang reuses
    shared memory by lifetime, so a gather buffer first written after the loop was placed over
    Q_shared and K_shared, and an early rank's stores corrupted rank 0's loop on the H100
    (H100-decode-cluster-probe-first-build-*.md). Lowered for sm_90a with no GPU."""
    import re

    from bench.decode_cluster_probe import D, GROUP, cluster_decode_module
    from sparsegen.codegen.tilelang_build import lower_sm90

    cluster = 2
    _, src, _ = lower_sm90(cluster_decode_module(cluster, warp_specialize=False), "probe")
    starts = {name: int(off) for name, off in re.findall(
        r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem \+ (\d+)\)\);", src)}
    sizes = {"o_gather": cluster * GROUP * D * 4, "lse_gather": cluster * GROUP * 4}
    assert set(sizes) <= set(starts), starts
    for name, size in sizes.items():
        lo, hi = starts[name], starts[name] + size
        inside = [other for other, off in starts.items() if other != name and lo <= off < hi]
        assert not inside, f"{name} [{lo}, {hi}) shares bytes with {inside}: {starts}"


def test_cluster_probe_two_launch_twins_are_feasible_at_the_cluster_tile():
    """Each cluster variant's two-launch twin is a feasible production TileLang config at the
    cluster kernel's tile and load form, and runs C splits (checked on the CPU: an infeasible
    twin would only fail on the GPU, after the device time is spent)."""
    from bench.decode_cluster_probe import BLOCK, D, GROUP, TILE, VARIANTS, two_launch_twins
    from sparsegen.codegen.decode_api import DecodeStatic

    static = DecodeStatic(block_size=BLOCK, head_dim=D, group_size=GROUP, dtype="bf16",
                          layout="contiguous", page_size=0)
    twins = two_launch_twins(static, VARIANTS)
    assert len(twins) == len(VARIANTS)
    for (cluster, ws), (name, (adapter, splits)) in zip(VARIANTS, twins.items()):
        assert name == f"twolaunch{cluster}_{'tma' if ws else 'cpasync'}" and splits == cluster
        c = adapter.config
        assert {k: c[k] for k in TILE} == TILE
        assert (c["block_n"], c["warp_specialize"]) == (BLOCK, ws)


def test_tuned_rule_configs_need_the_examples_adapter_too(monkeypatch):
    """A bench row runs an example's tuned rule-kernel config only where its statics and,
    when it names them, its adapter classes are the example's: a config tuned for one kernel
    is not another's of the same statics."""
    from bench.emitted import tuned_rule_configs
    from sparsegen.tune import db

    monkeypatch.setattr(db, "torch_gpu",   # the committed database's GPU, on this CPU
                        lambda device="cuda:0": db.GpuId("NVIDIA H100 80GB HBM3", "9.0"))
    kernels = rule_kernels(load_spec(SPECS / "nsa-topk.yaml"))
    statics = {name: static for name, _, static in kernels}
    adapters = {name: cls for name, cls, _ in kernels}
    cfgs, source = tuned_rule_configs(statics, ["nsa-topk"], 8, 131072, adapters=adapters)
    assert set(cfgs) == set(statics) and set(source.values()) == {"nsa-topk"}

    class OtherScore(adapters["quest_score"]):
        pass
    cfgs, _ = tuned_rule_configs(statics, ["nsa-topk"], 8, 131072,
                                 adapters={**adapters, "quest_score": OtherScore})
    assert set(cfgs) == set(statics) - {"quest_score"}


def test_entmax_whole_step_appends_summarizes_and_checks(monkeypatch):
    """The entmax bench's whole step (EntmaxDecoder.step over a KVCache, a block of steps a
    graph) runs on the CPU with the torch rule and attention, times one block per input set
    and reports per step; an attention that is wrong is caught by its check."""
    import torch

    from bench import methods_entmax_milestone as em
    from sparsegen.methods.entmax import EntmaxRule, block_summaries, select_blocks

    ran = []
    monkeypatch.setattr(em, "time_graph", lambda fns: ran.append([f() for f in fns]) or 2.0)
    g = torch.Generator().manual_seed(0)
    B, S = 2, em.BLOCK * 5
    k = torch.randn(B, S, em.HKV, em.D, generator=g)
    v = torch.randn_like(k)
    summ = torch.cat([block_summaries(k[b:b + 1], torch.zeros(em.HKV, em.D), em.BLOCK,
                                      torch.float32) for b in range(B)])
    rule = EntmaxRule(block_size=em.BLOCK, scale=2.0)

    def tau(q, s, seq, lengths):
        return select_blocks(q, s, torch.tensor(lengths), rule, width=s.shape[2])

    qs = [torch.randn(B, em.HQ, em.D, generator=g) for _ in range(2)]
    ms, err = em.whole_step_block_mean(tau, None, rule, k, v, summ, qs, g)
    assert ms == 2.0 / em.BLOCK and err == 0.0 and len(ran) == 1 and len(ran[0]) == len(qs)

    def wrong(q, **kw):  # attends nothing: the check must refuse it
        return torch.zeros_like(q)

    with pytest.raises(RuntimeError, match="whole step's output is wrong"):
        em.whole_step_block_mean(tau, wrong, rule, k, v, summ, qs, g)
