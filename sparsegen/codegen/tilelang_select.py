"""TileLang top-k selection (templates/tilelang/block_select.py.j2), block_select's
`algo=tilelang`.

One CTA per score row keeps the row's keys in shared memory and radix-selects them with
shared-memory histograms (the Triton radix passes run their reductions through Triton's
layouts instead). Three forms from one template: `emit="indices"` is the whole top-k of one
score row per output head (gate, NSA, Quest with group: shared); with several rows per output
head (Quest per query head) `emit="threshold"` writes each row's threshold key and tie count
(in the format of Triton's block_threshold), one CTA a row, and `emit="union"` turns them into
the union of the rows' selections, one CTA an output head. The row length is a compile-time
bound, picked per call from the scores' width (a power of two, at least the thread count), so
one config serves every capacity up to MAX_BLOCKS; compiled kernels are cached per process.
"""
from __future__ import annotations

from .render import render_and_import
from .tilelang_build import compiled_for, lower_sm90
from .triton_kernel import next_pow2

MAX_BLOCKS = 32768           # keys held in shared memory: 128 KB at the longest row
EMITS = ("indices", "threshold", "union")
UNION_RUN = 32               # blocks a thread of the union kernel owns (one 32-bit mask)


class TileLangTopk:
    """The rendered TileLang top-k for (block_size, threads, emit, rows)."""

    template = "tilelang/block_select.py.j2"

    def __init__(self, block_size: int, threads: int, emit: str, build_dir=None,
                 rows: int = 1):
        if emit not in EMITS:
            raise ValueError(f"emit {emit!r} is not one of {EMITS}")
        if threads not in (256, 512, 1024):
            raise ValueError(f"threads={threads} must be 256, 512 or 1024 (a thread per "
                             "radix bin at least)")
        if (emit == "union") != (rows > 1):
            raise ValueError(f"emit={emit!r} with rows={rows}: the union kernel is the one "
                             "for several score rows per output head")
        self.block_size, self.threads, self.emit, self.rows = block_size, threads, emit, rows
        self.build_dir = build_dir

    def launch_shape(self, row_blocks: int) -> tuple[int, int]:
        """(threads, nmax) compiled for rows of `row_blocks` blocks: nmax bounds the row (a
        power of two); the union kernel takes more threads on long rows, UNION_RUN blocks
        a thread at most."""
        if row_blocks > MAX_BLOCKS:
            raise ValueError(f"a row of {row_blocks} blocks exceeds the {MAX_BLOCKS} the "
                             "TileLang selection holds")
        threads = self.threads
        if self.emit == "union":
            threads = max(threads, next_pow2(row_blocks) // UNION_RUN)
        return threads, max(next_pow2(row_blocks), threads)

    def _module(self, threads: int, nmax: int):
        return render_and_import(self.template, {"block_size": self.block_size,
                                                 "threads": threads, "nmax": nmax,
                                                 "emit": self.emit, "rows": self.rows},
                                 self.build_dir)

    def _what(self) -> str:
        return f"tilelang block_select ({self.emit}, {self.threads} threads, {self.rows} rows)"

    def compile_sm90(self, row_blocks: int = 2048) -> dict:
        """Lower and nvcc-compile for sm_90a with no GPU; facts of the build."""
        mod = self._module(*self.launch_shape(row_blocks))
        _, source, cubin = lower_sm90(mod, self._what())
        return {"tilelang_" + self.emit: {"cubin_bytes": len(cubin),
                                          "cuda_source_chars": len(source)}}

    def _kernel(self, device, threads: int, nmax: int):
        key = ("block_select", self.block_size, threads, self.emit, self.rows, nmax)
        return compiled_for(key, device, lambda: self._module(threads, nmax), self._what())

    def __call__(self, scores, seq_lens, out: tuple, k: int, sink: int, local: int):
        """scores [B, H, NB] fp32 contiguous, seq_lens [B] int32; out = (indices [B, H, width],
        counts [B, H]) for emit="indices", (thr [B, H, 2],) for "threshold", (thr [B, H, 2]
        from the threshold kernel, indices [B, H / rows, width], counts [B, H / rows]) for
        "union", which ignores k (int32, contiguous). No device sync."""
        if not scores.is_cuda:
            raise RuntimeError("block_select algo=tilelang runs on a CUDA device only; "
                               "use a Triton algo (e.g. radix8) elsewhere")
        for t in (scores, *out):
            if not t.is_contiguous():
                raise ValueError("the TileLang selection takes contiguous scores and outputs")
        kernel = self._kernel(scores.device, *self.launch_shape(scores.shape[-1]))
        if self.emit == "union":
            kernel(scores, seq_lens, *out, int(sink), int(local))
        else:
            kernel(scores, seq_lens, *out, int(k), int(sink), int(local))
