"""Triton kernels of the topk rule (Quest / NSA): block scoring from the metadata
(templates/triton/quest_score.py.j2). `QuestSelect` chains scoring with the shared
`TritonBlockSelect` (per_head: one score row per query head, unioned per KV head). The
metadata update is folded into the KV append (sparsegen/codegen/kv_append.py, a
`TritonKVAppend` of `AppendStatic.of_quest`), which shares the metadata helpers below."""
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


def _meta_tensors(meta) -> tuple:
    """The metadata tensors of a QuestMeta, or of the tuner's plain form {"kmin", "kmax"} /
    {"kmean", "run_sum"} (dicts, so the tuner sees and sizes the tensors)."""
    if isinstance(meta, dict):
        return tuple(meta[k] for k in ("kmin", "kmax", "kmean") if k in meta)
    return meta.tensors()


def meta_args(meta):
    a = _meta_tensors(meta)
    return (a[0], a[1] if len(a) > 1 else a[0])


def run_sum_of(meta, fallback):
    run = meta.get("run_sum") if isinstance(meta, dict) else getattr(meta, "run_sum", None)
    return fallback if run is None else run


def _field(cache, name):
    """cache.name of a KVCache, or cache[name] of the tuner's plain {"seq_lens",
    "block_table"} (block_table absent or None when contiguous)."""
    return cache.get(name) if isinstance(cache, dict) else getattr(cache, name)


def _bt(cache, fallback):
    bt = _field(cache, "block_table")
    return bt if bt is not None else fallback


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

        a, b_ = meta_args(meta)
        B, Hq, D = q.shape
        H = a.shape[2]  # metadata [.., .., Hkv, D] in both layouts
        s = self.static
        if D != s.head_dim or Hq != H * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} does not match head_dim={s.head_dim}, "
                             f"group_size={s.group_size}, kv_heads={H}")
        if q.dtype != torch_dtype(s.dtype) or a.dtype != q.dtype or q.stride(2) != 1:
            raise TypeError(f"q and the metadata must be {s.dtype}, q's last dim contiguous")
        if out is None:
            out = torch.empty(B, self.score_rows(H), width, dtype=torch.float32, device=q.device)
        seq = _field(cache, "seq_lens")
        bt = _bt(cache, seq[:, None])
        per = self.config["block_j"] * self.config["tiles"]
        self.module.quest_score[(-(-width // per), H, B)](
            q, seq, bt, a, b_, out, q.stride(0), q.stride(1),
            a.stride(0), a.stride(1), a.stride(2), bt.stride(0), out.stride(0), out.stride(1),
            num_warps=self.config["num_warps"], num_stages=self.config["num_stages"])
        return out

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: QuestStatic, batch: int, seq_len: int, kv_heads: int = 8,
                     device="cuda", seed: int = 0) -> dict:
        """Scores of every block of seq_len-token sequences (width = their block count, so
        no output entry is left unwritten) from random metadata (kmin <= kmax)."""
        import torch

        s = static
        gen = torch.Generator(device=device).manual_seed(seed)
        cache = bench_block_table(s, batch, seq_len, gen, device)
        cache["seq_lens"] = torch.full((batch,), seq_len, dtype=torch.int32, device=device)
        return {"q": torch.randn(batch, kv_heads * s.group_size, s.head_dim, generator=gen,
                                 device=device).to(torch_dtype(s.dtype)),
                "meta": bench_meta(s, s.score, batch, seq_len, kv_heads, gen, device),
                "cache": cache,
                "width": -(-seq_len // s.block_size)}

    def reference(self, q, meta, cache, width: int):
        from ..methods.topk import quest_scores_reference

        if isinstance(meta, dict):
            meta, cache = reference_meta(self.static, self.static.score, meta, cache)
        return quest_scores_reference(q, meta, cache, self.static.group, width)


# --- the tuner's inputs: plain tensors (the tuner sizes its input sets by their bytes) -----
# `s` below is a QuestStatic or an AppendStatic with metadata (both have block_size,
# head_dim, dtype, layout, paged, page_size); `score` is the metadata's kind.
def bench_block_table(s, batch: int, seq_len: int, gen, device) -> dict:
    """{"block_table"} of sequences of seq_len tokens: pages scattered over the pool when
    paged (as bench's decode inputs), absent when contiguous."""
    import torch

    if not s.paged:
        return {}
    pages = -(-seq_len // s.page_size)
    table = torch.randperm(batch * pages, generator=gen, device=device).view(batch, pages)
    return {"block_table": table.to(torch.int32)}


def _meta_shape(s, batch: int, seq_len: int, kv_heads: int) -> tuple:
    if s.paged:
        return (batch * -(-seq_len // s.page_size), s.page_size // s.block_size, kv_heads,
                s.head_dim)
    return (batch, -(-seq_len // s.block_size), kv_heads, s.head_dim)


def bench_meta(s, score: str, batch: int, seq_len: int, kv_heads: int, gen,
                device) -> dict:
    import torch

    dt = torch_dtype(s.dtype)
    shape = _meta_shape(s, batch, seq_len, kv_heads)
    x = torch.randn(shape, generator=gen, device=device).to(dt)
    if score == "upper_bound":
        y = torch.randn(shape, generator=gen, device=device).to(dt)
        return {"kmin": torch.minimum(x, y), "kmax": torch.maximum(x, y)}
    return {"kmean": x, "run_sum": torch.randn(batch, kv_heads, s.head_dim, generator=gen,
                                               device=device)}


def reference_meta(s, score: str, meta: dict, cache: dict):
    """A QuestMeta holding copies of the plain metadata tensors, and the cache view its
    plain-torch methods read (no K/V: they only read lengths, the block table and shapes)."""
    from types import SimpleNamespace

    from ..methods.topk import QuestMeta

    a = _meta_tensors(meta)[0]
    seq = cache["seq_lens"]
    B, H, D = seq.shape[0], a.shape[2], a.shape[3]
    view = SimpleNamespace(
        batch=B, kv_heads=H, head_dim=D, device=a.device, layout=s.layout,
        page_size=s.page_size, seq_lens=seq, block_table=cache.get("block_table"),
        capacity=a.shape[1] * s.block_size if not s.paged else 0,
        k=a.new_empty((a.shape[0], 0)))  # dtype, and the page count of a paged pool
    ref = QuestMeta(view, s.block_size, score)
    for name, t in meta.items():
        setattr(ref, name, t.clone())
    return ref, view


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
