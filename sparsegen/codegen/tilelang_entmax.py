"""The entmax rule's decode selection in one TileLang kernel (templates/tilelang/entmax_tau.py.j2),
EntmaxTau's `algo=tilelang` (sparsegen.codegen.entmax_tau).

The Triton form is two launches: entmax_scores (many programs stream the block summaries) and
entmax_select (one program a row runs ~iters + 3 passes, each a chain of block-wide
reductions through Triton's layouts). Here one CTA a (KV head, batch) row scores its
summaries through shared memory into a shared row of z, and one warp solves each query head's
tau by passes over that row reduced with warp shuffles (no block barrier inside the solve):
the decode step loses one dependent launch and the solve's reductions get cheaper; with
`head_split` the group's heads share all the CTA's warps (a pass of one warp over 2048
candidates takes ~1.35 us on an H100), their partial sums combined by a named barrier. With
`cluster` > 1 a thread-block cluster of CTAs scores a row and rank 0 solves (measured on the
H100 in session 15: it pays only where rows are few, batch 1; bench/NOTES.md). The row length is a
compile-time bound picked per call from the summaries' capacity (a power of two), so one config
serves every capacity up to the shared-memory bound; compiled kernels are cached per process.
"""
from __future__ import annotations

from .tilelang_build import TL_DTYPES, compiled_for, lower_sm90
from .triton_kernel import next_pow2

MAX_ROW_VALUES = 16384   # group x blocks of z in shared memory (64 KB fp32)
THREADS = (256, 512)
BLOCK_J = (64, 128, 256)
CLUSTERS = (1, 2, 4)     # CTAs scoring a row (a thread-block cluster; rank 0 solves)


def unsupported(static) -> str | None:
    """Why the TileLang kernel cannot compile these EntmaxStatic statics, else None."""
    if static.dtype not in TL_DTYPES:
        return f"dtype {static.dtype} (the TileLang tau kernel takes bf16 or fp16)"
    if static.head_dim not in (64, 128):
        return f"head_dim={static.head_dim} (the TileLang tau kernel takes 64 or 128)"
    if not 1 <= static.group_size <= 16:
        return f"group_size={static.group_size} (at most 16 query heads a KV head: one MMA tile)"
    return None


def split_unsupported(static, threads: int) -> str | None:
    """Why the group's query heads cannot share the CTA's warps evenly (head_split), else
    None: the group must divide the warps, two or more a head."""
    warps = threads // 32
    if warps % static.group_size or warps // static.group_size < 2:
        return (f"group_size={static.group_size} does not split {warps} warps into two or "
                "more a query head")
    return None


class TileLangEntmaxTau:
    """The rendered TileLang tau kernel for EntmaxStatic statics and (threads, block_j,
    stages, cluster)."""

    template = "tilelang/entmax_tau.py.j2"

    def __init__(self, static, threads: int, block_j: int, stages: int, cluster: int = 1,
                 head_split: bool = False, build_dir=None):
        if reason := unsupported(static):
            raise ValueError(f"TileLang entmax tau: {reason}")
        if (threads not in THREADS or block_j not in BLOCK_J or not 1 <= stages <= 4
                or cluster not in CLUSTERS):
            raise ValueError(f"threads={threads}, block_j={block_j}, stages={stages}, "
                             f"cluster={cluster}: threads in {THREADS}, block_j in {BLOCK_J}, "
                             f"stages in [1, 4], cluster in {CLUSTERS}")
        if head_split and (reason := split_unsupported(static, threads)):
            raise ValueError(f"TileLang entmax tau: head_split: {reason}")
        self.static, self.threads, self.block_j, self.stages = static, threads, block_j, stages
        self.cluster, self.build_dir = cluster, build_dir
        # warps a query head's solve: every warp of the CTA, the group's heads side by side
        self.wph = threads // 32 // static.group_size if head_split else 1
        self._keys: dict = {}    # nmax -> compile-cache key (built once, not per decode step)

    def fits(self, capacity: int) -> bool:
        """Whether a row of `capacity` blocks fits the shared row of z."""
        return self.static.group_size * self.nmax(capacity) <= MAX_ROW_VALUES

    def nmax(self, capacity: int) -> int:
        """The compiled row bound for `capacity` blocks (a power of two, a whole number of
        runs, and of score tiles and of threads for each CTA of the cluster: its push to rank 0
        is whole rounds of the threads)."""
        per_cta = max(self.threads, self.block_j) if self.cluster > 1 else self.block_j
        return max(next_pow2(max(capacity, 1)), self.threads, per_cta * self.cluster)

    def _params(self, nmax: int) -> dict:
        s = self.static
        return {"block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
                "dtype": s.dtype, "tl_dtype": TL_DTYPES[s.dtype], "sink_blocks": s.sink_blocks,
                "local_blocks": s.local_blocks, "alpha": float(s.alpha),
                "iters": s.halley_iters, "prior": s.prior, "threads": self.threads,
                "block_j": self.block_j, "stages": self.stages, "cluster": self.cluster,
                "wph": self.wph, "nmax": nmax}

    def render_job(self, capacity: int) -> tuple:
        """(template, params, build_dir) of the kernel compiled for rows of `capacity` blocks,
        as render_and_import and tilelang_build.prewarm take them."""
        return self.template, self._params(self.nmax(capacity)), self.build_dir

    def _module(self, nmax: int):
        from .render import render_and_import

        return render_and_import(self.template, self._params(nmax), self.build_dir)

    def _what(self) -> str:
        return (f"tilelang entmax_tau ({self.threads} threads, block_j {self.block_j}, "
                f"{self.stages} stages, cluster {self.cluster}, {self.wph} warp(s) a head)")

    def compile_sm90(self, capacity: int = 2048) -> dict:
        """Lower and nvcc-compile for sm_90a with no GPU; facts of the build."""
        _, source, cubin = lower_sm90(self._module(self.nmax(capacity)), self._what())
        return {"tilelang_entmax_tau": {"cubin_bytes": len(cubin),
                                        "cuda_source_chars": len(source)}}

    def __call__(self, q, summaries, seq_lens, out: tuple, coef: float):
        """q [B, Hq, D], summaries [B, Hkv, cap, D] (contiguous, the statics' dtype), seq_lens
        [B] int32, out = (indices [B, Hkv, cap] int32, counts [B, Hkv] int32, bias
        [B, Hkv, cap] fp32), contiguous. No device sync."""
        nmax = self.nmax(summaries.shape[2])
        key = self._keys.get(nmax)
        if key is None:
            key = self._keys[nmax] = ("entmax_tau", *sorted(self._params(nmax).items()))
        kernel = compiled_for(key, summaries.device, lambda: self._module(nmax), self._what())
        kernel(q, summaries, seq_lens, *out, float(coef))
