"""Triton adapter of the entmax rule's decode append (templates/triton/summary_append.py.j2):
the cache append of kv_append.py.j2 plus, where the new token fills its block, that block's
attention-pool summary, in one launch.

The block that fills is found from seq_lens on the device: the torch path decides it on the
host (EntmaxDecoder._after_append), which a CUDA graph replays as it was captured, writing
one summary to the same block on every replay. Like the plain append it is memory-bound and
tiny and is not tuned; its module sits apart from kv_append.py so that the topk rule's tuned
`quest_meta` entries, keyed by that adapter's source, stay current."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .kv_append import AppendStatic, TritonKVAppend
from .triton_kernel import TRITON_PTR, TritonKernel, check_int_config, next_pow2

CHUNK_ELEMENTS = 4096  # keys x head dims a chunk of the summary's softmax holds in registers


@dataclass(frozen=True)
class SummaryAppendStatic:
    append: AppendStatic  # the cache's append (meta "none")
    block_size: int       # the entmax rule's block: one summary per full block

    def __post_init__(self):
        if self.append.meta != "none":
            raise ValueError("the summary append folds no topk metadata (meta must be none)")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {self.block_size!r}")

    @property
    def meta(self) -> str:
        return "attn_pool"  # what KVCache.append is told the kernel folds

    @property
    def new_dtype(self) -> str:
        return self.append.new_dtype

    @property
    def chunk(self) -> int:
        return max(1, min(next_pow2(self.block_size),
                          CHUNK_ELEMENTS // next_pow2(self.append.head_dim)))

    def as_dict(self) -> dict:
        return asdict(self)


class TritonSummaryAppend(TritonKernel):
    name = "summary_append"
    template = "triton/summary_append.py.j2"

    @classmethod
    def tunable_space(cls, static: SummaryAppendStatic) -> dict[str, list]:
        return {"num_warps": [2, 4, 8]}

    @classmethod
    def default_config(cls, static: SummaryAppendStatic) -> dict:
        return {"num_warps": 4}

    @classmethod
    def check_config(cls, static: SummaryAppendStatic, config: dict) -> str | None:
        return check_int_config(config, ("num_warps",))

    def template_params(self) -> dict:
        # the included kv_append.py.j2 takes the plain append's parameters, as its adapter
        # makes them
        plain = TritonKVAppend(self.static.append, {"num_warps": self.config["num_warps"]})
        return {**plain.template_params(), "summary_block": self.static.block_size,
                "chunk": self.static.chunk}

    def signatures(self):
        a = self.static.append
        new, dt = TRITON_PTR[a.new_dtype], TRITON_PTR[a.dtype]
        sig = {"K_NEW": new, "V_NEW": new, "K": dt, "V": dt, "SEQ": "*i32", "BT": "*i32",
               "W": "*fp32", "SUMM": dt}
        sig.update({s: "i32" for s in ("stride_nb", "stride_nh", "stride_cb", "stride_cs",
                                       "stride_ch", "stride_btb", "stride_sb", "stride_sh",
                                       "stride_sj")})
        div = ("K_NEW", "V_NEW", "K", "V", "SEQ", "W", "SUMM")
        return [("summary_append", sig, div,
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, k_new, v_new, k, v, seq_lens, block_table=None, meta=None):
        """Append k_new, v_new [B, Hkv, D] at slot seq_lens[b] of k, v, bump seq_lens, and
        where a sequence's block fills, write its summary: meta = (summaries [B, Hkv,
        blocks, D] in the cache dtype, w [Hkv, D] fp32). KVCache.append's `kernel` form."""
        import torch

        summaries, w = meta
        if k_new.shape != v_new.shape or k_new.stride() != v_new.stride() or \
                k.stride() != v.stride():
            raise ValueError("k and v (new and cached) must have matching shapes and strides")
        if k_new.stride(-1) != 1 or k.stride(-1) != 1 or summaries.stride(-1) != 1:
            raise ValueError("the head dimension must be contiguous")
        if summaries.dtype != k.dtype:
            raise TypeError(f"the summaries must be {k.dtype}, as the cache")
        if w.dtype != torch.float32 or not w.is_contiguous() or \
                tuple(w.shape) != (self.static.append.kv_heads, self.static.append.head_dim):
            raise ValueError(f"w must be a contiguous fp32 [Hkv, D] tensor, got "
                             f"{w.dtype} {tuple(w.shape)}")
        bt = block_table if block_table is not None else seq_lens[:, None]
        self.module.summary_append[(k_new.shape[0],)](
            k_new, v_new, k, v, seq_lens, bt, w, summaries,
            k_new.stride(0), k_new.stride(1), k.stride(0), k.stride(1), k.stride(2),
            bt.stride(0), summaries.stride(0), summaries.stride(1), summaries.stride(2),
            num_warps=self.config["num_warps"], num_stages=1)
