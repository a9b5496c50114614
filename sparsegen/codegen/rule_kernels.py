"""The selection-side kernels each rule's spec needs, beside the sparse decode attention:
(name, adapter class, static params) for the plan, `sparsegen compile` and the tuner (each
adapter has tunable_space / default_config / check_config, compile_sm90 and bench_inputs /
reference / __call__)."""
from __future__ import annotations

from .distill_kernels import DistillStatic, TritonDistillTarget
from .entmax_kernels import EntmaxDecodeTriton, EntmaxStatic
from .entmax_tau import EntmaxTau
from .entmax_prefill import EntmaxPrefillTriton
from .gate_kernels import GateScoreStatic, GateStepStatic, TritonGateScore, TritonGateStep
from .milestone_kernels import (MilestoneScoreTriton, MilestoneSelectStatic,
                                MilestoneSelectTriton, MilestoneStatic)
from .kv_append import AppendStatic, TritonKVAppend
from .quest_kernels import QuestStatic, TritonQuestScore
from .select_kernels import SelectStatic, TritonBlockSelect


def rule_kernels(spec) -> list[tuple[str, type, object]]:
    m, c, s = spec.model, spec.cache, spec.selection
    bs = s.block_size
    if s.rule == "gate":
        g = s.gate
        mode = "topk" if s.budget_tokens is not None else "softmax_threshold"
        return [
            ("gate_step", TritonGateStep,
             GateStepStatic(bs, m.head_dim, m.group_size, g.d_gate, g.pooling, g.rope,
                            g.rmsnorm, g.query_reduction, dtype=m.dtype, kc_dtype=m.dtype)),
            ("gate_score", TritonGateScore, GateScoreStatic(bs, g.d_gate, m.dtype)),
            ("block_select", TritonBlockSelect, SelectStatic(bs, mode, 1, exclude_current=True)),
            ("distill_target", TritonDistillTarget,
             DistillStatic(bs, m.head_dim, m.group_size, m.dtype)),
        ]
    if s.rule == "topk":
        t = s.topk
        static = QuestStatic(bs, m.head_dim, m.group_size, m.dtype, t.score, t.group, c.layout,
                             c.page_size or 0)
        rows = m.group_size if t.group == "per_head" else 1
        # quest_meta: the KV append that folds each new key into the metadata (one launch)
        return [("quest_meta", TritonKVAppend, AppendStatic.of_quest(static, m.num_kv_heads)),
                ("quest_score", TritonQuestScore, static),
                ("block_select", TritonBlockSelect, SelectStatic(bs, "topk", rows))]
    if s.rule == "entmax":
        static = EntmaxStatic.from_spec(spec)
        kernels = [("entmax_tau", EntmaxTau, static),
                   ("entmax_decode", EntmaxDecodeTriton, static)]
        if "prefill" in spec.phases:
            kernels.append(("entmax_prefill", EntmaxPrefillTriton, static))
        return kernels
    if s.rule == "milestone":
        return [("milestone_score", MilestoneScoreTriton, MilestoneStatic.from_spec(spec)),
                ("milestone_select", MilestoneSelectTriton, MilestoneSelectStatic.from_spec(spec))]
    return []
