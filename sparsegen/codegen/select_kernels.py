"""Triton adapter of the block-selection kernel (templates/triton/block_select.py.j2).

One program per (output head, batch) turns a row of block scores into the padded, ascending
block indices and counts the decode attention takes. Top-k is an exact select over
order-preserving integer keys, by one of the tunable algorithms (`algo`: four 8-bit
histogram passes; 16 or 8 counting passes of 2 or 4 bits; a bitonic sort of packed
(key, index) words; `tilelang`: the radix select, the union of several rows and the
compaction in TileLang with shared-memory histograms and thread scans,
sparsegen.codegen.tilelang_select, CUDA only), then one compaction pass, so the result equals
sparsegen.methods.selection bit for bit, ties included; the threshold mode applies a softmax
over the scored blocks first (the gate rule). Nothing depends on the sequence length at
compile time, and nothing syncs the device, so the call can be captured in a CUDA graph.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import cached_property

from .tilelang_select import MAX_BLOCKS, TileLangTopk
from .triton_kernel import TritonKernel, check_int_config, next_pow2, pow2

MODES = ("topk", "softmax_threshold")
_KEYS = ("chunk", "radix_chunk", "num_warps")
# top-k algorithms (template algo, count bits); the threshold mode has no choice to make
# (tilelang renders no Triton kernel; its entry keeps template_params defined)
ALGOS = {"radix8": ("radix8", 8), "count2": ("count", 2), "count4": ("count", 4),
         "sort": ("sort", 4), "tilelang": ("radix8", 8)}
_THRESHOLD_ALGO = "count4"


@dataclass(frozen=True)
class SelectStatic:
    block_size: int
    mode: str = "topk"
    rows: int = 1                  # score rows unioned into one output head
    exclude_current: bool = False  # softmax over blocks strictly before the current one

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")
        if not pow2(self.block_size):
            raise ValueError(f"block_size={self.block_size} must be a power of two")
        if not 1 <= self.rows <= 16:
            raise ValueError(f"rows={self.rows} out of [1, 16]")

    def as_dict(self) -> dict:
        return asdict(self)


class TritonBlockSelect(TritonKernel):
    name = "block_select"
    template = "triton/block_select.py.j2"
    depends_on = (TileLangTopk,)   # algo=tilelang renders and launches its template

    @classmethod
    def tunable_space(cls, static: SelectStatic) -> dict[str, list]:
        algos = list(ALGOS) if static.mode == "topk" else [_THRESHOLD_ALGO]
        return {"algo": algos, "chunk": [128, 256, 512, 1024, 2048],
                "radix_chunk": [256, 512, 1024, 2048, 8192], "num_warps": [1, 2, 4, 8, 16]}

    @classmethod
    def seed_configs(cls, static: SelectStatic) -> list[dict]:
        """The TileLang select at 256 and 512 threads, measured early in every top-k study
        (one algo among five, a few sampled trials could miss it)."""
        if static.mode != "topk":
            return []
        chunk = cls.default_config(static)["chunk"]
        return [{"algo": "tilelang", "chunk": chunk, "radix_chunk": 2048, "num_warps": nw}
                for nw in (8, 16)]

    @classmethod
    def default_config(cls, static: SelectStatic) -> dict:
        rows = next_pow2(static.rows)
        # H100 (bench/results/H100-block-select-tilelang.md): the TileLang select at 256
        # threads beat the tuned Triton radix8 on every measured shape (one row of 512 blocks:
        # 5.5 vs 10.2 us; Quest's per-row thresholds: 4.9-7.9 vs 12.3-18.7 us); off a CUDA
        # device and on rows longer than MAX_BLOCKS it runs Triton's radix8 (_streaming)
        algo = "tilelang" if static.mode == "topk" else _THRESHOLD_ALGO
        return {"algo": algo, "chunk": max(128, 1024 // rows), "radix_chunk": 2048,
                "num_warps": 8}

    @classmethod
    def check_config(cls, static: SelectStatic, config: dict) -> str | None:
        if "algo" not in config:
            return "missing keys ['algo']"
        algo = config["algo"]
        if not isinstance(algo, str) or algo not in ALGOS:
            return f"algo={algo!r} is not one of {sorted(ALGOS)}"
        if static.mode != "topk" and algo != _THRESHOLD_ALGO:
            return f"algo={algo!r}: the threshold mode has no top-k algorithm to choose"
        if reason := check_int_config({k: v for k, v in config.items() if k != "algo"}, _KEYS):
            return reason
        if algo == "tilelang":
            return cls._check_tilelang(static, config)
        chunk = config["chunk"]
        if not pow2(chunk) or not 16 <= chunk <= 8192:
            return f"chunk={chunk} must be a power of two in [16, 8192]"
        rc = config["radix_chunk"]
        if not pow2(rc) or not 32 <= rc <= 8192:
            return f"radix_chunk={rc} must be a power of two in [32, 8192]"
        if static.rows == 1 and rc < 32 * config["num_warps"]:
            return f"radix_chunk={rc} leaves threads idle at num_warps={config['num_warps']}"
        threads = 32 * config["num_warps"]
        if algo.startswith("count") and rc * (1 << ALGOS[algo][1]) > 512 * threads:
            # a pass compares each key with every digit's candidate in registers (512 a
            # thread compiles to ~220 registers, no spill; 1024 stalls the compiler)
            return (f"{algo}: radix_chunk={rc} keys x {1 << ALGOS[algo][1]} candidates exceed "
                    f"512 a thread at num_warps={config['num_warps']}")
        if algo == "radix8" and config["num_warps"] > 8:
            # Triton 3.6 fails a compiler pass on radix8 at 16 warps (every radix_chunk that
            # keeps the threads busy; bench/results/CPU-block-select-compile.md)
            return f"radix8: num_warps={config['num_warps']} does not compile (at most 8)"
        if algo == "count2" and rc > 32 * threads:
            # 64 keys a thread compile for 17-41 s, 128 for over a minute, holding a tuning
            # worker (CPU-block-select-compile.md); 32 compile in seconds
            return (f"count2: radix_chunk={rc} keys exceed 32 a thread at "
                    f"num_warps={config['num_warps']}")
        if algo == "radix8" and rc > 64 * threads:
            # 128 keys a thread (8192 at 2 warps) did not compile within 180 s on the H100
            # (bench/results/H100-tune-seer-rules.log); 64 a thread compiles and runs
            return (f"radix8: radix_chunk={rc} keys exceed 64 a thread at "
                    f"num_warps={config['num_warps']}")
        if algo == "sort" and rc > 32 * threads:  # 64 a thread spills
            return (f"sort: radix_chunk={rc} 64-bit words exceed 32 a thread at "
                    f"num_warps={config['num_warps']}")
        if next_pow2(static.rows) * chunk > 16384:
            return f"rows x chunk = {next_pow2(static.rows) * chunk} elements per pass exceed 16384"
        if next_pow2(static.rows) * chunk < 32 * config["num_warps"]:
            return f"rows x chunk leaves threads idle at num_warps={config['num_warps']}"
        return None

    @classmethod
    def _check_tilelang(cls, static: SelectStatic, config: dict) -> str | None:
        if config["num_warps"] not in (8, 16):
            return "tilelang: num_warps must be 8 or 16 (a thread per radix bin at least)"
        if config["radix_chunk"] != 2048:
            return "tilelang: radix_chunk is unused (the row sits in shared memory); leave 2048"
        chunk = cls.default_config(static)["chunk"]
        if config["chunk"] != chunk:
            return f"tilelang: chunk is unused (no Triton kernel runs); leave {chunk}"
        return None

    @cached_property
    def tilelang(self) -> tuple[TileLangTopk, ...]:
        """The TileLang kernels of algo=tilelang, else (): the whole select with one score
        row; with several, the per-row thresholds and then their union."""
        if self.config["algo"] != "tilelang":
            return ()
        s, threads = self.static, 32 * self.config["num_warps"]
        if s.rows == 1:
            return (TileLangTopk(s.block_size, threads, "indices", self.build_dir),)
        return (TileLangTopk(s.block_size, threads, "threshold", self.build_dir),
                TileLangTopk(s.block_size, threads, "union", self.build_dir, rows=s.rows))

    def compile_sm90(self, keep_asm: bool = False) -> dict:
        facts = {}
        for kern in self.tilelang:
            facts.update(kern.compile_sm90())
        return facts or super().compile_sm90(keep_asm)

    def template_params(self) -> dict:
        s, c = self.static, self.config
        algo, bits = ALGOS[c["algo"]]
        return {"block_size": s.block_size, "mode": s.mode, "rows": s.rows,
                "rows_pad": next_pow2(s.rows), "exclude_current": s.exclude_current,
                "algo": algo, "bits": bits, "chunk": c["chunk"], "radix_chunk": c["radix_chunk"],
                "num_warps": c["num_warps"]}

    @property
    def split(self) -> bool:
        """Top-k over several rows: per-row radix kernel, then the union kernel."""
        return self.static.mode == "topk" and self.static.rows > 1

    def signatures(self):
        kw = {"num_warps": self.config["num_warps"], "num_stages": 1}
        sig = {"SCORES": "*fp32", "SEQ": "*i32", "IDX": "*i32", "CNT": "*i32", "THR": "*i32",
               "k": "i32", "threshold": "fp32", "sink": "i32", "local": "i32", "width": "i32"}
        for a in ("stride_sb", "stride_sh", "stride_ib", "stride_ih", "stride_cb", "stride_ch",
                  "stride_tb", "stride_th"):
            sig[a] = "i32"
        out = [("block_select", sig, ("SCORES", "SEQ", "IDX", "CNT"), kw)]
        if self.split:
            thr = {"SCORES": "*fp32", "SEQ": "*i32", "THR": "*i32", "k": "i32", "sink": "i32",
                   "local": "i32"}
            for a in ("stride_sb", "stride_sh", "stride_tb", "stride_th"):
                thr[a] = "i32"
            out.insert(0, ("block_threshold", thr, ("SCORES", "SEQ", "THR"), kw))
        return out

    # --- runtime ---------------------------------------------------------------------------
    def __call__(self, scores, seq_lens, *, k: int = 0, threshold: float = 0.0, sink: int = 0,
                 local: int = 1, width: int, out=None):
        """scores [B, H, NB] fp32 (last dim contiguous), seq_lens [B] int32 -> (indices
        [B, H // rows, width] int32, counts [B, H // rows] int32)."""
        import torch

        B, H, _ = scores.shape
        s = self.static
        if scores.dtype != torch.float32 or scores.stride(2) != 1:
            raise TypeError("scores must be fp32 with a contiguous last dimension")
        if seq_lens.dtype != torch.int32:
            raise TypeError("seq_lens must be int32")
        if H % s.rows:
            raise ValueError(f"{H} score rows do not split into groups of {s.rows}")
        heads = H // s.rows
        if out is None:
            idx = torch.empty(B, heads, width, dtype=torch.int32, device=scores.device)
            cnt = torch.empty(B, heads, dtype=torch.int32, device=scores.device)
        else:
            idx, cnt = out
        tl = self.tilelang
        if tl and (scores.shape[-1] > MAX_BLOCKS or not scores.is_cuda):
            return self._streaming(scores, seq_lens, k=k, threshold=threshold, sink=sink,
                                     local=local, width=width, out=(idx, cnt))
        if len(tl) == 1:
            tl[0](scores.contiguous(), seq_lens, (idx, cnt), k, sink, local)
            return idx, cnt
        if tl:
            scores = scores.contiguous()
            thr = torch.empty(B, H, 2, dtype=torch.int32, device=scores.device)
            tl[0](scores, seq_lens, (thr,), k, sink, local)
            tl[1](scores, seq_lens, (thr, idx, cnt), k, sink, local)
            return idx, cnt
        kw = {"num_warps": self.config["num_warps"], "num_stages": 1}
        mod = self.module
        if self.split:
            thr = torch.empty(B, H, 2, dtype=torch.int32, device=scores.device)
            mod.block_threshold[(H, B)](
                scores, seq_lens, thr, int(k), int(sink), int(local), scores.stride(0),
                scores.stride(1), thr.stride(0), thr.stride(1), **kw)
        else:
            thr = cnt  # not read
        mod.block_select[(heads, B)](
            scores, seq_lens, idx, cnt, thr, int(k), float(threshold), int(sink), int(local),
            int(width), scores.stride(0), scores.stride(1), idx.stride(0), idx.stride(1),
            cnt.stride(0), cnt.stride(1), thr.stride(0), thr.stride(1) if thr.dim() > 1 else 0,
            **kw)
        return idx, cnt

    @cached_property
    def _streaming(self) -> "TritonBlockSelect":
        """algo=tilelang where TileLang cannot run (rows longer than it holds in shared
        memory, scores off a CUDA device, e.g. under TRITON_INTERPRET): Triton's radix select,
        which streams a row of any length and returns the same selection."""
        return TritonBlockSelect(self.static, dict(self.config, algo="radix8", num_warps=8),
                                 self.build_dir)

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: SelectStatic, batch: int, seq_len: int, heads: int = 8,
                     budget_blocks: int = 64, device="cuda", seed: int = 0) -> dict:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        nb = -(-seq_len // static.block_size)
        scores = torch.randn(batch, heads * static.rows, nb, device=device, generator=gen)
        if static.mode == "softmax_threshold":
            threshold, k = 1.0 / nb * 2, 0
        else:
            threshold, k = 0.0, budget_blocks
        width = nb if static.mode != "topk" else min(nb, static.rows * max(k, 2))
        return {"scores": scores, "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32,
                                                         device=device),
                "k": k, "threshold": threshold, "sink": 1, "local": 1, "width": width}

    def reference(self, scores, seq_lens, *, k=0, threshold=0.0, sink=0, local=1, width):
        from ..methods import selection as sel

        nb = sel.num_blocks(seq_lens, self.static.block_size)
        if self.static.mode == "topk":
            return sel.select_topk(scores, nb, k, sink, local, self.static.rows, width)
        probs = softmax_over_scored(scores, nb, self.static.exclude_current)
        return sel.select_threshold(probs, nb, threshold, sink, local, self.static.rows, width)


def softmax_over_scored(logits, nblocks, exclude_current: bool):
    """Softmax of each row over its scored blocks (j < nb, or j < nb - 1 when the current
    block is excluded); other entries are 0. The threshold mode's probabilities."""
    import torch

    NB = logits.shape[-1]
    n_scored = nblocks.long() - (1 if exclude_current else 0)
    scored = torch.arange(NB, device=logits.device)[None, :] < n_scored[:, None]
    x = logits.float().masked_fill(~scored[:, None, :], float("-inf"))
    p = torch.softmax(x, -1)
    return torch.where(scored[:, None, :], p, torch.zeros_like(p))
