"""One decode step of the gate and topk rules as one call.

    out = decoder.step(q, k_new, v_new, cache, attend, ...)

appends the new K/V to the cache, updates the rule's metadata (gate: K-compression cache;
topk: block min/max or mean, in the append's launch on the kernel path), scores the blocks,
selects them and attends:
`attend(q, block_indices=..., block_counts=..., **cache.attention_args())` (keywords, so a
decode backend adapter, `__call__(q, k, v, block_indices, block_counts, seq_lens,
block_table)`, is an `attend` as it is) is the torch reference on the CPU
(`reference_attend`), the tuned kernel on a GPU. `impl` picks the
scoring/selection path: "torch" (the method reference) or "triton" (the generated kernels,
which select exactly the same blocks). A layer listed in the spec's dense_layers selects
every block and keeps no metadata (DenseDecoder: the same for the rules without a dense path).
"""
from __future__ import annotations

import torch

from . import selection as sel
from .gate import AttnGate, GateState, gate_logits_reference
from .kv_cache import KVCache
from .sparse_decode_ref import sparse_decode_reference
from .topk import QuestMeta, quest_scores_reference


def reference_attend(block_size: int, compute_dtype=torch.float32):
    """The plain-torch sparse decode attention in the `attend` calling convention."""
    def attend(q, k, v, block_indices, block_counts, seq_lens, block_table=None):
        out = sparse_decode_reference(q, k, v, block_indices, block_counts, seq_lens,
                                      block_size, block_table=block_table,
                                      compute_dtype=compute_dtype, validate=False)
        return out.to(q.dtype)
    return attend


class _Decoder:
    """What both rules share: selection parameters, index widths, the dense path."""

    rows = 1  # score rows unioned per KV head (Quest per_head: the group size)

    def __init__(self, selection, max_blocks: int, impl: str, dense: bool):
        if impl not in ("torch", "triton"):
            raise ValueError(f"impl {impl!r} is not torch or triton")
        self.block_size = selection.block_size
        self.sink, self.local = selection.sink_blocks, selection.local_blocks
        self.budget_blocks = (selection.budget_tokens // selection.block_size
                              if selection.budget_tokens is not None else None)
        self.threshold = selection.threshold
        self.max_blocks, self.impl, self.dense = max_blocks, impl, dense

    @property
    def width(self) -> int:
        """Width of the block_indices this decoder produces (shape-only)."""
        if self.dense or self.budget_blocks is None:
            return self.max_blocks
        return sel.topk_width(self.budget_blocks, self.sink, self.local, self.max_blocks,
                              self.rows)

    def select_dense(self, cache: KVCache):
        return sel.select_all(sel.num_blocks(cache.seq_lens, self.block_size), cache.kv_heads,
                              self.width)


class GateDecoder(_Decoder):
    """SeerAttention-R decode: one decision per KV group from the AttnGate."""

    def __init__(self, gate: AttnGate, selection, batch: int, capacity: int, device="cpu",
                 impl: str = "torch", dense: bool = False, kc_dtype=torch.float32,
                 kernel_configs: dict | None = None, build_dir=None,
                 overlap_append: bool = True):
        if gate.block_size != selection.block_size:
            raise ValueError(f"gate block_size {gate.block_size} != selection block_size "
                             f"{selection.block_size}")
        if not dense and (selection.budget_tokens is None) == (selection.threshold is None):
            raise ValueError("the gate rule needs exactly one of budget_tokens or threshold")
        super().__init__(selection, -(-capacity // selection.block_size), impl, dense)
        self.gate = gate
        self.state = None if dense else GateState(gate, batch, capacity, device, kc_dtype)
        self._kernels, self._step_kernels, self._qg = None, {}, None
        self._kernel_configs = kernel_configs or {}
        self._build_dir = build_dir
        self.logits = None  # scratch [B, Hkv, max_blocks] of the kernel path
        # step(): the state update on a side stream (overlap_append, the default) or serial.
        # On the H100 the side stream is faster at 32K in both runs that compared them (up to
        # 2 %, then 1.4 / 3.5 % at B 8 / 16) and in every block-filling step; at 128K the two
        # are within 1-2 % either way (H100-step-gate-topk.md's side / serial table)
        self.overlap_append = overlap_append
        self._side, self._stepped = None, False

    @classmethod
    def from_spec(cls, spec, gate: AttnGate, batch: int, capacity: int, layer: int = 0,
                  **kw) -> "GateDecoder":
        return cls(gate, spec.selection, batch, capacity,
                   dense=layer in spec.model.dense_layers, **kw)

    @property
    def mode(self) -> str:
        return "topk" if self.budget_blocks is not None else "softmax_threshold"

    def prefill(self, cache: KVCache, k, v, k_nope=None, lengths=None) -> None:
        """k, v [B, n, Hkv, D] post-RoPE into the cache; k_nope [B, n, Hkv, D] (pre-RoPE)
        fills the K-compression cache in one pass. lengths: valid tokens per sequence."""
        lengths = cache.prefill_lengths(k, v, lengths)
        if not self.dense and (k_nope is None or k_nope.shape != k.shape):
            raise ValueError("the gate rule's prefill needs the pre-RoPE keys k_nope, shaped "
                             f"like k {tuple(k.shape)}; got "
                             f"{None if k_nope is None else tuple(k_nope.shape)}")
        for b, n in enumerate(lengths):
            start, _ = cache.extend(b, k[b, :n], v[b, :n])
            if not self.dense and n:
                self.state.extend(b, k_nope[b, :n], start)

    def gate_query(self, q_nope: torch.Tensor, cache: KVCache, impl: str | None = None):
        """The gate query [B, Hkv, dg] fp32 of the current token (position seq_len - 1)."""
        if (impl or self.impl) == "triton":
            if self._qg is None:
                self._qg = torch.empty(q_nope.shape[0], self.gate.num_kv_heads,
                                       self.gate.d_gate, dtype=torch.float32,
                                       device=q_nope.device)
            return self.step_kernels(q_nope.dtype).query(
                self.gate, q_nope.contiguous(), cache.seq_lens, self.state.capacity, out=self._qg)
        with torch.no_grad():
            return self.gate.query(q_nope, cache.seq_lens.long() - 1).contiguous()

    def append_state(self, k_nope: torch.Tensor, cache: KVCache, impl: str | None = None):
        """Fold the token just appended (pre-RoPE key k_nope [B, Hkv, D]) into the
        K-compression cache state."""
        if (impl or self.impl) == "triton":
            self.step_kernels(k_nope.dtype).append(self.state, k_nope.contiguous(),
                                                   cache.seq_lens)
        else:
            self.state.append(k_nope, cache.seq_lens)

    def step_kernels(self, dtype):
        """The fused query / append kernels for pre-RoPE inputs of `dtype`."""
        from ..codegen.gate_kernels import GateStepStatic, TritonGateStep
        from ..codegen.triton_kernel import dtype_name

        name = dtype_name(dtype)
        if name not in self._step_kernels:
            st = GateStepStatic.of(self.gate, name, dtype_name(self.state.kc.dtype))
            self._step_kernels[name] = TritonGateStep(
                st, self._kernel_configs.get("gate_step"), self._build_dir)
        return self._step_kernels[name]

    def select(self, q_nope: torch.Tensor, cache: KVCache, impl: str | None = None):
        """Blocks to attend for the current token (already in the cache): (block_indices
        [B, Hkv, width] int32, block_counts [B, Hkv] int32)."""
        if self.dense:
            return self.select_dense(cache)
        qg = self.gate_query(q_nope, cache, impl)
        kw = dict(sink=self.sink, local=self.local, width=self.width)
        if (impl or self.impl) == "triton":
            if self.logits is None:
                self.logits = torch.empty(self.state.kc.shape[:3], dtype=torch.float32,
                                          device=qg.device)
            return self.kernels(k=self.budget_blocks or 0, threshold=self.threshold or 0.0,
                                q_gate=qg, kc=self.state.kc, seq_lens=cache.seq_lens,
                                logits=self.logits, **kw)
        logits = gate_logits_reference(qg, self.state.kc, cache.seq_lens, self.block_size)
        nb = sel.num_blocks(cache.seq_lens, self.block_size)
        if self.mode == "topk":
            return sel.select_topk(logits, nb, self.budget_blocks, **kw)
        probs = torch.softmax(logits, -1).nan_to_num(0.0)  # a row with no scored block is 0
        return sel.select_threshold(probs, nb, self.threshold, **kw)

    @property
    def kernels(self):
        if self._kernels is None:
            from ..codegen.gate_kernels import GateSelect
            self._kernels = GateSelect(self.block_size, self.gate.d_gate, self.state.kc.dtype,
                                       self.mode, self._kernel_configs.get("gate_score"),
                                       self._kernel_configs.get("block_select"),
                                       self._build_dir)
        return self._kernels

    def step(self, q, k_new, v_new, cache: KVCache, attend, q_nope=None, k_nope=None):
        """q [B, Hq, D], k_new / v_new [B, Hkv, D] post-RoPE; q_nope / k_nope the same
        token's pre-RoPE query and key (the gate's inputs). Returns attend's output.

        On the kernel path the compression-cache update (gate_append) runs on a side stream
        beside query -> score -> select -> attend, joined before returning: it writes the
        running pools and the entry of the block this token is in, which this step never
        reads (gate_score scores only the blocks strictly before it; gate_query reads
        neither). The decoder's first step runs serially, so the kernels' lazily built
        tables and counters are created on the caller's stream before any overlap."""
        if not self.dense and (q_nope is None or k_nope is None):  # before the cache changes
            raise ValueError("the gate rule's step needs the pre-RoPE q_nope and k_nope")
        cache.append(k_new, v_new)
        side = None
        if not self.dense:
            side = self._append_stream(k_nope)
            if side is None:
                self.append_state(k_nope, cache)
            else:
                side.wait_stream(torch.cuda.current_stream(k_nope.device))
                with torch.cuda.stream(side):
                    self.append_state(k_nope, cache)
        idx, cnt = self.select(q_nope, cache)
        out = attend(q, block_indices=idx, block_counts=cnt, **cache.attention_args())
        if side is None:
            self._stepped = True
        else:
            torch.cuda.current_stream(k_nope.device).wait_stream(side)
        return out

    def _append_stream(self, k_nope: torch.Tensor):
        """The side stream of the state update: kernel path on CUDA after the first step
        (with overlap_append), else None (serial)."""
        if not (self.overlap_append and self.impl == "triton" and k_nope.is_cuda
                and self._stepped):
            return None
        if self._side is None or self._side.device != k_nope.device:
            self._side = torch.cuda.Stream(k_nope.device)
        return self._side


class TopkDecoder(_Decoder):
    """Quest (per_head) / NSA-style (shared) decode from per-block key metadata."""

    def __init__(self, selection, num_q_heads: int, cache: KVCache, impl: str = "torch",
                 dense: bool = False, kernel_configs: dict | None = None, build_dir=None):
        if not dense and selection.budget_tokens is None:
            raise ValueError("the topk rule needs budget_tokens")
        super().__init__(selection, -(-cache.capacity // selection.block_size), impl, dense)
        self.score, self.group = selection.topk.score, selection.topk.group
        self.num_q_heads = num_q_heads
        self.group_size = num_q_heads // cache.kv_heads
        self.rows = self.group_size if self.group == "per_head" else 1
        self.meta = None if dense else QuestMeta(cache, self.block_size, self.score)
        self._kernel_configs = kernel_configs or {}
        self._build_dir = build_dir
        self._kernels = None
        self.scores = None

    @classmethod
    def from_spec(cls, spec, cache: KVCache, layer: int = 0, **kw) -> "TopkDecoder":
        return cls(spec.selection, spec.model.num_q_heads, cache,
                   dense=layer in spec.model.dense_layers, **kw)

    def prefill(self, cache: KVCache, k, v, lengths=None) -> None:
        lengths = cache.prefill_lengths(k, v, lengths)
        for b, n in enumerate(lengths):
            start, stop = cache.extend(b, k[b, :n], v[b, :n])
            if not self.dense and n:
                self.meta.fill(cache, b, start, stop)

    def _static(self, cache: KVCache):
        from ..codegen.quest_kernels import QuestStatic
        from ..codegen.triton_kernel import dtype_name
        return QuestStatic(self.block_size, cache.head_dim, self.group_size,
                           dtype_name(cache.k.dtype), self.score, self.group, cache.layout,
                           cache.page_size if cache.layout == "paged" else 0)

    def kernels(self, cache: KVCache):
        """(the append that folds the new key into the metadata, QuestSelect): the rule's
        tuned `quest_meta` and `quest_score` / `block_select` kernels."""
        if self._kernels is None:
            from ..codegen.kv_append import AppendStatic, TritonKVAppend
            from ..codegen.quest_kernels import QuestSelect
            st = self._static(cache)
            cfg = self._kernel_configs
            self._kernels = (TritonKVAppend(AppendStatic.of_quest(st, cache.kv_heads),
                                            cfg.get("quest_meta"), self._build_dir),
                             QuestSelect(st, cfg.get("quest_score"), cfg.get("block_select"),
                                         self._build_dir))
        return self._kernels

    def append(self, cache: KVCache, k_new, v_new, impl: str | None = None) -> None:
        """Append the token's K / V [B, Hkv, D] and fold its key into the metadata: one
        launch on the kernel path; on the torch path the cache's own append, then
        QuestMeta.append."""
        kernel = None
        if not self.dense and (impl or self.impl) == "triton":
            kernel = self.kernels(cache)[0]
        cache.append(k_new, v_new, meta=self.meta, kernel=kernel)

    def select(self, q, cache: KVCache, impl: str | None = None):
        if self.dense:
            return self.select_dense(cache)
        kw = dict(k=self.budget_blocks, sink=self.sink, local=self.local, width=self.width)
        if (impl or self.impl) == "triton":
            if self.scores is None:
                rows = self.num_q_heads if self.group == "per_head" else cache.kv_heads
                self.scores = torch.empty(cache.batch, rows, self.max_blocks,
                                          dtype=torch.float32, device=q.device)
            return self.kernels(cache)[1](q.contiguous(), self.meta, cache, scores=self.scores,
                                          max_blocks=self.max_blocks, **kw)
        scores = quest_scores_reference(q, self.meta, cache, self.group, self.max_blocks)
        nb = sel.num_blocks(cache.seq_lens, self.block_size)
        return sel.select_topk(scores, nb, rows=self.rows, **kw)

    def step(self, q, k_new, v_new, cache: KVCache, attend):
        self.append(cache, k_new, v_new)
        idx, cnt = self.select(q, cache)
        return attend(q, block_indices=idx, block_counts=cnt, **cache.attention_args())


class DenseDecoder(_Decoder):
    """A layer listed in the spec's dense_layers under a rule whose decoder has no dense path
    of its own (entmax, milestone): it keeps no rule state and attends every block. The
    rule's extra step inputs, if any, are ignored."""

    def __init__(self, selection, capacity: int):
        super().__init__(selection, -(-capacity // selection.block_size), "torch", True)

    def prefill(self, cache: KVCache, k, v, lengths=None, **_rule_inputs) -> None:
        for b, n in enumerate(cache.prefill_lengths(k, v, lengths)):
            cache.extend(b, k[b, :n], v[b, :n])

    def step(self, q, k_new, v_new, cache: KVCache, attend=None, **_rule_inputs):
        cache.append(k_new, v_new)
        idx, cnt = self.select_dense(cache)
        attend = attend or reference_attend(self.block_size)
        return attend(q, block_indices=idx, block_counts=cnt, **cache.attention_args())
