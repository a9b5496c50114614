"""Triton adapter of the fused KV-cache append (templates/triton/kv_append.py.j2): one launch
per decode step writes every sequence's new K and V at its length and bumps the length on the
device, where the torch path costs an index computation, two scatters and an add (~12 us of
small kernels per step on the H100).

With `meta` (the topk rule's block metadata, `AppendStatic.of_quest`) the same launch folds
the new key into its block's min / max or running mean, where the rule ran a second,
dependent launch (~2 us of a decode step). That form is the topk rule's tuned `quest_meta`
kernel (sparsegen.codegen.rule_kernels); the plain one is memory-bound and tiny and is not
tuned."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .quest_kernels import (bench_block_table, bench_meta, meta_args, reference_meta,
                            run_sum_of)
from .triton_kernel import TRITON_PTR, TritonKernel, check_int_config, next_pow2, torch_dtype

METAS = ("none", "upper_bound", "mean_pooled")


@dataclass(frozen=True)
class AppendStatic:
    head_dim: int
    kv_heads: int
    dtype: str = "bf16"          # the cache's dtype (and the metadata's)
    new_dtype: str = "bf16"      # the appended k/v's dtype (cast on store)
    layout: str = "contiguous"
    page_size: int = 0
    meta: str = "none"           # the topk metadata folded in the same launch (METAS)
    block_size: int = 0          # the metadata's block (with meta)

    def __post_init__(self):
        if self.layout not in ("contiguous", "paged"):
            raise ValueError(f"layout {self.layout!r} is not contiguous or paged")
        if self.layout == "paged" and self.page_size <= 0:
            raise ValueError("paged layout needs page_size > 0")
        for name in (self.dtype, self.new_dtype):
            if name not in TRITON_PTR:
                raise ValueError(f"dtype {name!r} is not one of {tuple(TRITON_PTR)}")
        if not 1 <= self.head_dim <= 512 or not 1 <= self.kv_heads <= 256:
            raise ValueError(f"head_dim={self.head_dim} / kv_heads={self.kv_heads} out of range")
        if self.meta not in METAS:
            raise ValueError(f"meta {self.meta!r} is not one of {METAS}")
        if self.meta != "none":
            if self.block_size <= 0:
                raise ValueError(f"meta {self.meta} needs block_size > 0")
            if self.paged and self.page_size % self.block_size:
                raise ValueError(f"page_size {self.page_size} is not a multiple of block_size "
                                 f"{self.block_size}")

    @classmethod
    def of_quest(cls, quest, kv_heads: int) -> "AppendStatic":
        """The append that keeps a topk spec's metadata (a QuestStatic: its block, score,
        dtype and cache layout) for `kv_heads` KV heads (QuestStatic has the group size, not
        the head count). New keys come in the cache's dtype, as in a decode step."""
        return cls(quest.head_dim, kv_heads, quest.dtype, quest.dtype, quest.layout,
                   quest.page_size, quest.score, quest.block_size)

    @property
    def paged(self) -> bool:
        return self.layout == "paged"

    def as_dict(self) -> dict:
        return asdict(self)


class TritonKVAppend(TritonKernel):
    name = "kv_append"
    template = "triton/kv_append.py.j2"

    @classmethod
    def tunable_space(cls, static: AppendStatic) -> dict[str, list]:
        return {"num_warps": [1, 2, 4]}

    @classmethod
    def default_config(cls, static: AppendStatic) -> dict:
        return {"num_warps": 2}

    @classmethod
    def check_config(cls, static: AppendStatic, config: dict) -> str | None:
        return check_int_config(config, ("num_warps",))

    def template_params(self) -> dict:
        s = self.static
        return {"head_dim": s.head_dim, "head_pad": next_pow2(s.head_dim),
                "kv_heads": s.kv_heads,
                "heads_pad": next_pow2(s.kv_heads), "paged": s.paged,
                "page_size": s.page_size, "meta": s.meta, "block_size": s.block_size,
                "num_warps": self.config["num_warps"]}

    def signatures(self):
        s = self.static
        new, dt = TRITON_PTR[s.new_dtype], TRITON_PTR[s.dtype]
        sig = {"K_NEW": new, "V_NEW": new, "K": dt, "V": dt, "SEQ": "*i32", "SEQ_OUT": "*i32",
               "BT": "*i32"}
        strides = ["stride_nb", "stride_nh", "stride_cb", "stride_cs", "stride_ch",
                   "stride_btb"]
        div = ["K_NEW", "V_NEW", "K", "V", "SEQ", "SEQ_OUT"]
        if s.meta != "none":
            sig.update(META_A=dt, META_B=dt, RUN_SUM="*fp32")
            strides += ["stride_mb", "stride_mj", "stride_mh", "stride_sb", "stride_sh"]
            div += ["META_A", "META_B", "RUN_SUM"]
        sig.update({a: "i32" for a in strides})
        return [("kv_append", sig, tuple(div),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, k_new, v_new, k, v, seq_lens, block_table=None, meta=None,
                 seq_out=None):
        """Write k_new, v_new [B, Hkv, D] at slot seq_lens[b] of k, v and set seq_out[b] =
        seq_lens[b] + 1 (seq_out None: seq_lens itself, a decode step). With a meta static,
        also fold the key into `meta` (QuestMeta, or the tuner's plain dict {"kmin", "kmax"}
        / {"kmean", "run_sum"}). Returns the outputs: (seq_out, kmin, kmax) / (seq_out,
        kmean, run_sum) / (seq_out,)."""
        if k_new.shape != v_new.shape or k_new.stride() != v_new.stride() or \
                k.stride() != v.stride():
            raise ValueError("k and v (new and cached) must have matching shapes and strides")
        if k_new.stride(-1) != 1 or k.stride(-1) != 1:
            raise ValueError("the head dimension must be contiguous")
        seq_out = seq_lens if seq_out is None else seq_out
        bt = block_table if block_table is not None else seq_lens[:, None]
        args = [k_new, v_new, k, v, seq_lens, seq_out, bt]
        strides = [k_new.stride(0), k_new.stride(1), k.stride(0), k.stride(1), k.stride(2),
                   bt.stride(0)]
        outs = (seq_out,)
        if self.static.meta != "none":
            a, b_ = meta_args(meta)  # min, max / mean, mean (unused)
            run = run_sum_of(meta, seq_lens)  # unused by upper_bound
            if a.dtype != k.dtype or a.stride(-1) != 1:
                raise TypeError(f"the metadata must be {k.dtype} with a contiguous last dim")
            args += [a, b_, run]
            strides += [a.stride(0), a.stride(1), a.stride(2),
                        *((run.stride(0), run.stride(1)) if run.dim() == 3 else (0, 0))]
            outs += (a, b_) if self.static.meta == "upper_bound" else (a, run)
        self.module.kv_append[(k_new.shape[0],)](
            *args, *strides, num_warps=self.config["num_warps"], num_stages=1)
        return outs

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: AppendStatic, batch: int, seq_len: int, device="cuda",
                     seed: int = 0) -> dict:
        """One decode step's append at ~seq_len tokens; lengths go to a scratch `seq_out`, so
        every replay appends at the same slot. K and V are views whose token dimension has
        stride 0 (one slot per sequence, or per page when paged, holds every position):
        the kernel writes the bytes a real cache takes, and the input set stays the size
        of the metadata. The metadata covers every earlier block. upper_bound: positions in
        [seq_len - block_size, seq_len), one at a block's first token (a repeated fold is
        idempotent: min / max). mean_pooled: every sequence at a block's first token, the
        one position where the running-sum update is idempotent (the kernel does the same
        loads and stores at every position)."""
        import torch

        s, bs = static, static.block_size
        H, D = s.kv_heads, s.head_dim
        gen = torch.Generator(device=device).manual_seed(seed)
        last = (seq_len - 1) // bs * bs if bs else seq_len - 1  # a block's first token
        if s.meta == "upper_bound":
            pos = torch.randint(max(0, seq_len - bs), seq_len, (batch,), generator=gen,
                                device=device)
            pos[0] = last
        else:
            pos = torch.full((batch,), last, device=device)
        inputs = bench_block_table(s, batch, seq_len, gen, device)  # {"block_table"} when paged
        rows, slots = ((inputs["block_table"].numel(), s.page_size) if s.paged
                       else (batch, seq_len))
        kv = [torch.zeros(rows, 1, H, D, dtype=torch_dtype(s.dtype), device=device)
              .expand(rows, slots, H, D) for _ in range(2)]
        new = [torch.randn(batch, H, D, generator=gen, device=device)
               .to(torch_dtype(s.new_dtype)) for _ in range(2)]
        inputs.update(k_new=new[0], v_new=new[1], k=kv[0], v=kv[1],
                      seq_lens=pos.to(torch.int32),
                      seq_out=torch.zeros(batch, dtype=torch.int32, device=device))
        if s.meta != "none":
            inputs["meta"] = bench_meta(s, s.meta, batch, seq_len, H, gen, device)
        return inputs

    def reference(self, k_new, v_new, k, v, seq_lens, block_table=None, meta=None,
                  seq_out=None):
        """The torch path on copies: the lengths plus one, and QuestMeta.append on a copy of
        the metadata (it casts the key to the cache dtype, as the kernel does). K and V are
        not compared here: bench inputs write them through stride-0 views; the kernel's
        writes are checked against the torch append in tests/test_topk.py and
        tests/test_kv_cache.py."""
        out = seq_lens + 1
        if self.static.meta == "none":
            return (out,)
        ref, view = reference_meta(self.static, self.static.meta, meta,
                                    {"seq_lens": out, "block_table": block_table})
        ref.append(view, k_new)
        return (out, *(ref.tensors() if ref.score == "upper_bound" else (ref.kmean, ref.run_sum)))
