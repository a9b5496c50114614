"""The entmax rule's tuned decode selection: the Triton pair or the one TileLang kernel.

EntmaxTau is the `entmax_tau` kernel the tuner and the emitted module run. Its `algo` config
key picks the form: `triton` is EntmaxTauTriton (entmax_scores + entmax_select, two launches;
sparsegen.codegen.entmax_kernels), `tilelang` is TileLangEntmaxTau (scores, tau and the
selection in one launch, one CTA a row or a cluster of `cluster` CTAs scoring it;
sparsegen.codegen.tilelang_entmax), which runs on CUDA devices for bf16 / fp16 statics and
rows that fit its shared memory; elsewhere (e.g. under TRITON_INTERPRET) the Triton pair
runs at its default config and selects the same blocks. Both take the same inputs and
return the same Selection (sparsegen.methods.entmax). Kept apart from entmax_kernels.py so
its edits leave the Triton kernels' tuned entries (entmax_decode shares that module) current.
"""
from __future__ import annotations

import math
from functools import cached_property

import torch

from ..methods.entmax import Selection
from .entmax_kernels import EntmaxTauTriton
from .tilelang_entmax import (BLOCK_J, CLUSTERS, THREADS, TileLangEntmaxTau, split_unsupported,
                              unsupported)
from .triton_kernel import torch_dtype

ALGOS = ("triton", "tilelang")


class EntmaxTau(EntmaxTauTriton):
    """EntmaxTauTriton's call and tuner protocol, plus `algo`, `cluster` and `head_split` (see
    the module doc). The TileLang kernel uses block_j (summaries a pipeline step), stages,
    num_warps (8 or 16: 256 or 512 threads), cluster (CTAs scoring a row) and head_split (the
    group's heads solved by all the warps, not one warp each); the Triton-only keys stay at
    their defaults under it, and cluster at 1 and head_split at 0 under algo=triton."""

    depends_on = (TileLangEntmaxTau,)   # algo=tilelang renders and launches its template
    OWN_KEYS = ("algo", "cluster", "head_split")   # the keys EntmaxTauTriton does not have

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        space = super().tunable_space(static)
        return {"algo": list(ALGOS), **space, "block_j": sorted({*space["block_j"], *BLOCK_J}),
                "num_warps": sorted({*space["num_warps"], *(t // 32 for t in THREADS)}),
                "cluster": list(CLUSTERS), "head_split": [0, 1]}

    @classmethod
    def default_config(cls, static) -> dict:
        return {"algo": "triton", **super().default_config(static), "cluster": 1,
                "head_split": 0}

    @classmethod
    def seed_configs(cls, static) -> list[dict]:
        """The TileLang kernel at 256 and 512 threads, each also with the heads' solve split
        over all the warps where the group divides them, and a row over a cluster of 2 CTAs,
        measured early in every study (one algo of two; a few sampled trials could miss its
        few feasible points). Clusters won only at batch 1 (H100, session 15: at B8 / 128K
        29.6 us on 2 CTAs, 39.8 on 4, 28.0 on one; bench/results/H100-tune-dash-entmax-tau-
        cluster.log)."""
        if unsupported(static):
            return []
        base = dict(cls.default_config(static), algo="tilelang")
        one_cta = [dict(base, block_j=64, stages=3, num_warps=8),
                   dict(base, block_j=128, stages=2, num_warps=16)]
        split = [dict(c, head_split=1) for c in one_cta
                 if not split_unsupported(static, 32 * c["num_warps"])]
        return [*one_cta, *split, dict(one_cta[0], cluster=2)]

    @classmethod
    def check_config(cls, static, config) -> str | None:
        algo, cluster, split = (config.get(k) for k in cls.OWN_KEYS)
        if algo not in ALGOS:
            return f"algo={algo!r} is not one of {ALGOS}"
        if cluster not in CLUSTERS:
            return f"cluster={cluster!r} is not one of {CLUSTERS}"
        if split not in (0, 1):
            return f"head_split={split!r} is not 0 or 1"
        rest = {k: v for k, v in config.items() if k not in cls.OWN_KEYS}
        if algo == "triton":
            if (rest.get("num_warps", 0) > 8 or rest.get("block_j", 0) > 128 or cluster != 1
                    or split):
                return (f"num_warps={rest.get('num_warps')}, block_j={rest.get('block_j')}, "
                        f"cluster={cluster}, head_split={split}: the Triton kernels take at "
                        "most 8 warps and 128-block tiles, no cluster (1) and no head_split")
            return super().check_config(static, rest)
        if reason := unsupported(static):
            return f"tilelang: {reason}"
        default = super().default_config(static)
        if set(rest) != set(default):
            return f"tilelang: config keys {sorted(rest)} are not {sorted(default)}"
        if bad := super().check_config(static, rest):   # key types, alpha
            return bad
        if 32 * rest["num_warps"] not in THREADS:
            return f"tilelang: num_warps must give {THREADS} threads"
        if rest["block_j"] not in BLOCK_J or rest["block_j"] < 8 * rest["num_warps"]:
            return (f"tilelang: block_j must be in {BLOCK_J} and give each warp 8 columns of "
                    f"the score tile (>= {8 * rest['num_warps']})")
        if split and (reason := split_unsupported(static, 32 * rest["num_warps"])):
            return f"tilelang: head_split: {reason}"
        if not 1 <= rest["stages"] <= 3:
            return f"stages={rest['stages']} out of [1, 3]"
        staged = rest["stages"] * rest["block_j"] * static.head_dim * 2
        if staged > 128 * 1024:
            # beside a row of z (64 KB at the longest) in the H100's 227 KB of shared memory
            return f"tilelang: {staged // 1024} KB of staged summaries exceed 128 KB"
        for key in ("tiles", "chunk", "select_warps"):
            if rest[key] != default[key]:
                return f"tilelang: {key} is unused (no Triton kernel runs); leave {default[key]}"
        return None

    def template_params(self) -> dict:
        params = super().template_params()
        for key in self.OWN_KEYS:
            params.pop(key)
        return params

    @cached_property
    def tilelang(self) -> TileLangEntmaxTau | None:
        """The TileLang kernel of algo=tilelang, else None."""
        c = self.config
        if c["algo"] != "tilelang":
            return None
        return TileLangEntmaxTau(self.static, 32 * c["num_warps"], c["block_j"], c["stages"],
                                 c["cluster"], bool(c["head_split"]), self.build_dir)

    @cached_property
    def _triton(self) -> EntmaxTauTriton:
        """The Triton pair at its default config: algo=tilelang where TileLang cannot run."""
        return EntmaxTauTriton(self.static, None, self.build_dir, self.scale)

    def tilelang_jobs(self, batch: int, seq_len: int) -> list:
        """The TileLang kernels a tuning call at (batch, seq_len) builds (its summaries hold
        a row of ceil(seq_len / block) blocks, as bench_inputs makes them), in the form
        tilelang_build.prewarm takes: the tuner's CPU worker builds them into TileLang's disk
        cache, so the GPU child loads them instead of compiling while it holds the GPU."""
        tl = self.tilelang
        capacity = -(-seq_len // self.static.block_size)
        return [tl.render_job(capacity)] if tl is not None and tl.fits(capacity) else []

    def compile_sm90(self, keep_asm: bool = False) -> dict:
        if self.tilelang is not None:
            return self.tilelang.compile_sm90()
        return super().compile_sm90(keep_asm)

    def __call__(self, q, summaries, seq_lens, lengths=None):
        tl = self.tilelang
        if tl is None:
            return super().__call__(q, summaries, seq_lens, lengths)
        cap = summaries.shape[2]
        if not (q.is_cuda and tl.fits(cap)):
            return self._triton(q, summaries, seq_lens, lengths)
        s = self.static
        B, Hq, D = q.shape
        Hkv = summaries.shape[1]
        if D != s.head_dim or Hq != Hkv * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / summaries {tuple(summaries.shape)} do not "
                             f"match head_dim={s.head_dim}, group_size={s.group_size}")
        if q.dtype != torch_dtype(s.dtype) or summaries.dtype != q.dtype:
            raise TypeError(f"q and summaries must be {s.dtype}")
        out = self._outputs(B, Hkv, cap, q.device)
        tl(q.contiguous(), summaries.contiguous(), seq_lens, out,
           (s.alpha - 1.0) * self.scale / math.sqrt(D))
        return Selection(*out)

    def _outputs(self, B, Hkv, cap, device):
        """Persistent (indices, counts, bias) of a shape, as the Triton pair keeps them (only
        the first count entries of a row are written)."""
        key = ("tilelang", B, Hkv, cap, device)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = (
                torch.full((B, Hkv, cap), -1, dtype=torch.int32, device=device),
                torch.zeros(B, Hkv, dtype=torch.int32, device=device),
                torch.zeros(B, Hkv, cap, dtype=torch.float32, device=device))
        return buf
