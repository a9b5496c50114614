"""Triton kernels of the topk rule (Quest / NSA): metadata update on append
(templates/triton/quest_meta.py.j2) and block scoring from the metadata
(templates/triton/quest_score.py.j2). `QuestSelect` chains scoring with the shared
`TritonBlockSelect` (per_head: one score row per query head, unioned per KV head)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .select_kernels import SelectStatic, TritonBlockSelect
from .triton_kernel import (TRITON_PTR, TritonKernel, check_int_config, next_pow2, pow2,
                            torch_dtype)


@dataclass(frozen=True)
class QuestStatic:
    block_size: int
    head_dim: int
    group_size: int
    dtype: str = "bf16"
    score: str = "upper_bound"     # or mean_pooled
    group: str = "per_head"        # or shared
    layout: str = "contiguous"
    page_size: int = 0

    def __post_init__(self):
        if self.score not in ("upper_bound", "mean_pooled"):
            raise ValueError(f"score {self.score!r} is not upper_bound or mean_pooled")
        if self.group not in ("per_head", "shared"):
            raise ValueError(f"group {self.group!r} is not per_head or shared")
        if self.layout not in ("contiguous", "paged"):
            raise ValueError(f"layout {self.layout!r} is not contiguous or paged")
        if self.layout == "paged" and (self.page_size <= 0 or self.page_size % self.block_size):
            raise ValueError("paged layout needs page_size a positive multiple of block_size")
        if self.dtype not in TRITON_PTR:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TRITON_PTR)}")

    @property
    def paged(self) -> bool:
        return self.layout == "paged"

    def as_dict(self) -> dict:
        return asdict(self)


_ELEM = {"bf16": 2, "fp16": 2, "fp32": 4}


def _meta_args(meta):
    a = meta.tensors()
    return (a[0], a[1] if len(a) > 1 else a[0])


def _bt(cache, fallback):
    return cache.block_table if cache.block_table is not None else fallback


class TritonQuestMeta(TritonKernel):
    name = "quest_meta"
    template = "triton/quest_meta.py.j2"

    @classmethod
    def tunable_space(cls, static: QuestStatic) -> dict[str, list]:
        return {"num_warps": [1, 2, 4]}

    @classmethod
    def default_config(cls, static: QuestStatic) -> dict:
        return {"num_warps": 1}

    @classmethod
    def check_config(cls, static: QuestStatic, config: dict) -> str | None:
        return check_int_config(config, ("num_warps",))

    def template_params(self) -> dict:
        s = self.static
        return {"block_size": s.block_size, "head_dim": s.head_dim, "score": s.score,
                "paged": s.paged, "page_size": s.page_size,
                "num_warps": self.config["num_warps"]}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        sig = {"KNEW": dt, "SEQ": "*i32", "BT": "*i32", "META_A": dt, "META_B": dt,
               "RUN_SUM": "*fp32"}
        for a in ("stride_kb", "stride_kh", "stride_mb", "stride_mj", "stride_mh", "stride_btb",
                  "stride_sb", "stride_sh"):
            sig[a] = "i32"
        return [("quest_meta_append", sig, ("KNEW", "SEQ", "META_A", "META_B", "RUN_SUM"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, meta, cache, k_new):
        """Fold k_new [B, Hkv, D] (already appended to `cache`) into `meta` (QuestMeta)."""
        a, b_ = _meta_args(meta)
        run = getattr(meta, "run_sum", cache.seq_lens)  # unused by upper_bound
        if k_new.dtype != a.dtype or k_new.stride(2) != 1:
            raise TypeError(f"k_new must be {a.dtype} with a contiguous last dimension")
        bt = _bt(cache, cache.seq_lens[:, None])
        B, H = k_new.shape[:2]
        rs = (run.stride(0), run.stride(1)) if run.dim() == 3 else (0, 0)
        self.module.quest_meta_append[(H, B)](
            k_new, cache.seq_lens, bt, a, b_, run, k_new.stride(0), k_new.stride(1),
            a.stride(0), a.stride(1), a.stride(2), bt.stride(0), *rs,
            num_warps=self.config["num_warps"], num_stages=1)


class TritonQuestScore(TritonKernel):
    name = "quest_score"
    template = "triton/quest_score.py.j2"

    @classmethod
    def tunable_space(cls, static: QuestStatic) -> dict[str, list]:
        return {"block_j": [16, 32, 64, 128], "tiles": [1, 2, 4, 8, 16],
                "num_stages": [1, 2, 3, 4], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static: QuestStatic) -> dict:
        for bj in (32, 16):  # the widest tile that does not spill (H100 sweep: 32 x 4 tiles)
            cfg = {"block_j": bj, "tiles": 4, "num_stages": 2, "num_warps": 4}
            if cls.check_config(static, cfg) is None:
                return cfg
        return cfg

    @classmethod
    def check_config(cls, static: QuestStatic, config: dict) -> str | None:
        if reason := check_int_config(config, ("block_j", "tiles", "num_stages", "num_warps")):
            return reason
        if not 1 <= config["tiles"] <= 64 or not 1 <= config["num_stages"] <= 6:
            return "tiles must lie in [1, 64] and num_stages in [1, 6]"
        bj = config["block_j"]
        if not pow2(bj) or not 16 <= bj <= 256:
            return f"block_j={bj} must be a power of two in [16, 256] (tl.dot needs >= 16)"
        tiles = 2 if static.score == "upper_bound" else 1
        words = tiles * bj * static.head_dim * _ELEM[static.dtype] / 4 / (32 * config["num_warps"])
        if words > 32:  # seen on sm_90: 64 words of metadata per thread take 255 registers
            # (num_stages buffers live in shared memory, not registers)
            return (f"{tiles} metadata tile(s) of {bj}x{static.head_dim} give {words:.0f} "
                    f"registers per thread at {config['num_warps']} warps (> 32 spills)")
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
                "g_pad": max(16, next_pow2(s.group_size)), "dtype": s.dtype, "score": s.score,
                "group": s.group, "paged": s.paged, "page_size": s.page_size,
                "block_j": c["block_j"], "tiles": c["tiles"], "num_stages": c["num_stages"],
                "num_warps": c["num_warps"]}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        sig = {"Q": dt, "SEQ": "*i32", "BT": "*i32", "META_A": dt, "META_B": dt,
               "OUT": "*fp32"}
        for a in ("stride_qb", "stride_qh", "stride_mb", "stride_mj", "stride_mh", "stride_btb",
                  "stride_ob", "stride_oh"):
            sig[a] = "i32"
        return [("quest_score", sig, ("Q", "SEQ", "META_A", "META_B", "OUT"),
                 {"num_warps": self.config["num_warps"],
                  "num_stages": self.config["num_stages"]})]

    def score_rows(self, kv_heads: int) -> int:
        return kv_heads * (self.static.group_size if self.static.group == "per_head" else 1)

    def __call__(self, q, meta, cache, width: int, out=None):
        """q [B, Hq, D] post-RoPE -> scores [B, rows, width] fp32 (rows = Hq per_head, Hkv
        shared); entries past a sequence's blocks are left untouched."""
        import torch

        a, b_ = _meta_args(meta)
        B, Hq, D = q.shape
        H = cache.kv_heads
        s = self.static
        if D != s.head_dim or Hq != H * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} does not match head_dim={s.head_dim}, "
                             f"group_size={s.group_size}, kv_heads={H}")
        if q.dtype != torch_dtype(s.dtype) or a.dtype != q.dtype or q.stride(2) != 1:
            raise TypeError(f"q and the metadata must be {s.dtype}, q's last dim contiguous")
        if out is None:
            out = torch.empty(B, self.score_rows(H), width, dtype=torch.float32, device=q.device)
        bt = _bt(cache, cache.seq_lens[:, None])
        per = self.config["block_j"] * self.config["tiles"]
        self.module.quest_score[(-(-width // per), H, B)](
            q, cache.seq_lens, bt, a, b_, out, q.stride(0), q.stride(1),
            a.stride(0), a.stride(1), a.stride(2), bt.stride(0), out.stride(0), out.stride(1),
            num_warps=self.config["num_warps"], num_stages=self.config["num_stages"])
        return out

    def reference(self, q, meta, cache, width: int):
        from ..methods.topk import quest_scores_reference
        return quest_scores_reference(q, meta, cache, self.static.group, width)


class QuestSelect:
    """Quest / NSA scoring + selection of one decode step: two launches, no host sync."""

    def __init__(self, static: QuestStatic, score_config=None, select_config=None,
                 build_dir=None):
        rows = static.group_size if static.group == "per_head" else 1
        self.score = TritonQuestScore(static, score_config, build_dir)
        self.select = TritonBlockSelect(SelectStatic(static.block_size, "topk", rows),
                                        select_config, build_dir)

    def __call__(self, q, meta, cache, *, k: int, sink: int, local: int, width: int,
                 max_blocks: int, scores=None):
        scores = self.score(q, meta, cache, max_blocks, out=scores)
        return self.select(scores, cache.seq_lens, k=k, sink=sink, local=local, width=width)
