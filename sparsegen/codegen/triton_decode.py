"""Triton backend of block-sparse GQA decode attention (templates/triton/sparse_decode.py.j2).

Two kernels per call: a split-KV attention kernel over the selected blocks only (grid
(num_splits, Hkv, B); the G query heads of one KV head are the rows of one tile) that writes
fp32 partial outputs and base-2 log-sum-exps, and a merge kernel (grid (Hq, B)) that combines
the splits in fp32 and writes `out` in q's dtype. The split count is a runtime argument,
computed from shapes only, so a call never syncs the device and never recompiles for a new
sequence length; the whole call can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
import os
import pickle
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from .backend import CompileError, DecodeBackend
from .decode_api import DecodeStatic
from .render import import_file, render_to_file

LOG2E = 1.4426950408889634
SMEM_LIMIT = 232448          # 227 KB: the most dynamic shared memory one H100 CTA may take
SMEM_PER_SM = 233472         # 228 KB per SM (1 KB of it reserved per CTA)
H100_SMS = 132
REGS_LIMIT = 200             # estimate above which a split kernel ran into ptxas's 255 cap
MAX_SPLITS = 256
_ELEM_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
_CONFIG_KEYS = ("block_n", "num_warps", "num_stages", "waves", "min_blocks_per_split",
                "merge_chunk", "merge_warps")
_OPTIONAL_KEYS = {"pdl": 0}  # 1: merge kernel launched with programmatic dependent launch
_NUM_SMS: dict = {}


def _pow2(x: int) -> bool:
    return x > 0 and (x & (x - 1)) == 0


def _g_pad(group: int) -> int:
    return max(16, 1 << (group - 1).bit_length())


def split_count(batch: int, kv_heads: int, max_selected: int, num_sms: int, waves: int,
                min_blocks_per_split: int) -> int:
    """Splits per (batch, KV head), from shapes only (no device sync, CUDA-graph safe).

    `waves` is the number of programs each SM should hold at once (about the occupancy).
    Unlike decode_api.default_num_splits this rounds *down*: one program over
    waves * num_sms spills a second, nearly empty round that doubles the time of a
    memory-bound kernel whose programs do equal work.
    """
    rows = max(1, batch * kv_heads)
    want = max(1, (waves * num_sms) // rows)
    most = max(1, math.ceil(max_selected / max(1, min_blocks_per_split)))
    return max(1, min(want, most, MAX_SPLITS))


def _num_sms(device) -> int:
    import torch

    if device.type != "cuda":
        return H100_SMS
    key = device.index if device.index is not None else torch.cuda.current_device()
    n = _NUM_SMS.get(key)
    if n is None:
        n = _NUM_SMS[key] = torch.cuda.get_device_properties(key).multi_processor_count
    return n


class TritonSparseDecode(DecodeBackend):
    name = "triton"
    template = "triton/sparse_decode.py.j2"
    # Subclass hook (class or instance attribute): True renders the split kernel with a
    # per-selected-block logit bias, BIAS [B, Hkv, max_sel] fp32 in natural log, passed to
    # _launch as block_bias (EntmaxDecodeTriton's prior). False renders the plain kernel.
    has_block_bias = False

    def __init__(self, static: DecodeStatic, config: dict | None = None, build_dir=None):
        super().__init__(static, config, build_dir)
        self._module = None
        self._paths: dict = {}
        self._kw_split = dict(num_warps=self.config["num_warps"],
                              num_stages=self.config["num_stages"])
        self._kw_merge = dict(num_warps=self.config["merge_warps"], num_stages=1)
        if self.config.get("pdl", 0):
            self._kw_merge["launch_pdl"] = True
        self._default_scale = static.head_dim ** -0.5
        self._dtype = None       # torch dtype, set on first call (torch stays out of compile workers)
        self._paged = static.layout == "paged"
        self._kernels = None     # (split, merge) @jit functions, looked up on first call

    # --- tuning space (CPU only) -------------------------------------------------------
    @classmethod
    def _block_n_choices(cls, static: DecodeStatic) -> list[int]:
        return [n for n in (16, 32, 64, 128)
                if static.block_size % n == 0 or n % static.block_size == 0]

    @classmethod
    def tunable_space(cls, static: DecodeStatic) -> dict[str, list]:
        return {
            "block_n": cls._block_n_choices(static),
            "num_warps": [2, 4, 8],
            "num_stages": [1, 2, 3, 4, 5, 6],
            "waves": [1, 2, 3, 4, 6, 8],
            "min_blocks_per_split": [1, 2, 4, 8],
            "merge_chunk": [16, 32],
            "merge_warps": [2, 4],
            "pdl": [0, 1],
        }

    @classmethod
    def smem_bytes(cls, static: DecodeStatic, config: dict) -> int:
        """Estimate of the split kernel's shared memory: num_stages - 1 buffers of the K and
        V tiles in flight (Triton's cp.async pipeliner; one without pipelining), the query
        tile and the probability tile on its way to the second dot (matches the compiled
        kernels' `shared` exactly for the default configs)."""
        eb = _ELEM_BYTES[static.dtype]
        n, d, g = config["block_n"], static.head_dim, _g_pad(static.group_size)
        buffers = max(1, config["num_stages"] - 1)
        return buffers * 2 * n * d * eb + g * d * eb + g * n * eb

    @classmethod
    def regs_per_thread(cls, static: DecodeStatic, config: dict) -> int:
        """Rough 32-bit registers per thread of the split kernel: fp32 accumulator, query
        operand, scores and probabilities, one K or V operand tile, plus a fixed overhead.
        Calibrated on ptxas for sm_90 (triton 3.6): within about -10/+50 of the real count."""
        eb = _ELEM_BYTES[static.dtype]
        n, d, g = config["block_n"], static.head_dim, _g_pad(static.group_size)
        words = g * d + g * d * eb / 4 + 2 * g * n + n * d * eb / 4
        return int(words / (32 * config["num_warps"])) + 64

    @classmethod
    def occupancy(cls, static: DecodeStatic, config: dict) -> int:
        """Resident split programs per SM, as limited by shared memory and registers."""
        by_smem = SMEM_PER_SM // (cls.smem_bytes(static, config) + 1024)
        regs = min(255, max(32, cls.regs_per_thread(static, config)))
        by_regs = 65536 // (regs * 32 * config["num_warps"])
        return max(1, min(by_smem, by_regs, 32 // config["num_warps"]))

    @classmethod
    def default_config(cls, static: DecodeStatic) -> dict:
        """H100 defaults: 64-token tiles (16 KB per K or V tile at D=128 bf16, 16-byte
        cp.async), about 96 KB of K/V in flight per program, one program per SM (waves=1).
        Measured on the H100 (bench/results/triton_smoke_h100.*, Hq 32 / Hkv 8 / D 128 /
        block 64, 128K context, 10% selected, CUDA-graph replay): 2.80 TB/s of selected KV at
        batch 8, 2.91 at batch 16, 1.9 at batch 1, where fewer and longer splits beat three
        programs per SM (1.65). PDL for the merge measured no gain, so it is off."""
        eb = _ELEM_BYTES[static.dtype]
        block_n = 64
        tile = 2 * block_n * static.head_dim * eb
        num_stages = max(2, min(6, 1 + (96 * 1024) // tile))
        return {"block_n": block_n, "num_warps": 4, "num_stages": num_stages, "waves": 1,
                "min_blocks_per_split": 2, "merge_chunk": 16, "merge_warps": 4, "pdl": 0}

    @classmethod
    def check_config(cls, static: DecodeStatic, config: dict) -> str | None:
        missing = [k for k in _CONFIG_KEYS if k not in config]
        if missing:
            return f"missing keys {missing}"
        unknown = sorted(set(config) - set(_CONFIG_KEYS) - set(_OPTIONAL_KEYS))
        if unknown:
            return f"unknown keys {unknown}"
        for k in _CONFIG_KEYS + tuple(k for k in _OPTIONAL_KEYS if k in config):
            if not isinstance(config[k], int) or isinstance(config[k], bool):
                return f"{k}={config[k]!r} is not an int"
        n, bs, d = config["block_n"], static.block_size, static.head_dim
        if not _pow2(n) or not 16 <= n <= 256:
            return f"block_n={n} must be a power of two in [16, 256] (tl.dot needs >= 16)"
        if bs % n and n % bs:
            return f"block_n={n} neither divides block_size={bs} nor is a multiple of it"
        if not _pow2(bs) or not _pow2(d):
            return f"block_size={bs} and head_dim={d} must be powers of two"
        if not 1 <= static.group_size <= 64:
            return f"group_size={static.group_size} out of [1, 64]"
        if static.layout == "paged" and static.page_size % bs:
            return f"page_size={static.page_size} is not a multiple of block_size={bs}"
        if config["num_warps"] not in (1, 2, 4, 8):
            return f"num_warps={config['num_warps']} not in (1, 2, 4, 8)"
        if n < 8 * config["num_warps"]:
            return f"block_n={n} gives fewer than 8 score columns per warp at num_warps={config['num_warps']}"
        if not 1 <= config["num_stages"] <= 8:
            return f"num_stages={config['num_stages']} out of [1, 8]"
        if not 1 <= config["waves"] <= 32:
            return f"waves={config['waves']} out of [1, 32]"
        if config["min_blocks_per_split"] < 1:
            return "min_blocks_per_split must be >= 1"
        if not _pow2(config["merge_chunk"]) or not 2 <= config["merge_chunk"] <= 128:
            return f"merge_chunk={config['merge_chunk']} must be a power of two in [2, 128]"
        if config.get("pdl", 0) not in (0, 1):
            return f"pdl={config['pdl']} not in (0, 1)"
        if config["merge_warps"] not in (1, 2, 4, 8):
            return f"merge_warps={config['merge_warps']} not in (1, 2, 4, 8)"
        smem = cls.smem_bytes(static, config)
        if smem > SMEM_LIMIT:
            return f"shared memory estimate {smem} B exceeds {SMEM_LIMIT} B (227 KB)"
        regs = cls.regs_per_thread(static, config)
        if regs > REGS_LIMIT:
            return f"register estimate {regs}/thread exceeds {REGS_LIMIT} (ptxas would cap at 255 or spill)"
        return None

    # --- code generation -----------------------------------------------------------------
    def template_params(self, interpret: bool = False) -> dict:
        s, c = self.static, self.config
        return {
            "block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
            "g_pad": _g_pad(s.group_size), "dtype": s.dtype, "paged": s.layout == "paged",
            "page_size": s.page_size, "block_n": c["block_n"], "num_warps": c["num_warps"],
            "num_stages": c["num_stages"], "merge_chunk": c["merge_chunk"],
            "merge_warps": c["merge_warps"], "interpret": interpret,
            "pdl": bool(c.get("pdl", 0)), "has_block_bias": bool(self.has_block_bias),
        }

    def render(self, interpret: bool = False):
        """Render the GPU module (or, with interpret=True, the TRITON_INTERPRET=1 variant,
        which differs only in reading indices through tl.load instead of inline PTX)."""
        path = self._paths.get(interpret)
        if path is None:
            path = self._paths[interpret] = render_to_file(
                self.template, self.template_params(interpret), self.build_dir)
        return path

    @property
    def module(self):
        """The rendered module for this process: interpreter variant under TRITON_INTERPRET=1."""
        if self._module is None:
            from triton import knobs
            interpret = bool(knobs.runtime.interpret)
            if interpret:
                _patch_interpreter_index()
            self._module = import_file(self.render(interpret))
        return self._module

    def _signatures(self):
        dt = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[self.static.dtype]
        bias = self.has_block_bias
        split = {"Q": dt, "K": dt, "V": dt, "IDX": "*i32", "CNT": "*i32", "SEQ": "*i32",
                 "BT": "*i32", **({"BIAS": "*fp32"} if bias else {}),
                 "O_PART": "*fp32", "LSE_PART": "*fp32", "qk_scale": "fp32"}
        ints = ("num_splits", "max_sel", "stride_qb", "stride_qh", "stride_kb", "stride_ks",
                "stride_kh", "stride_vb", "stride_vs", "stride_vh", "stride_ib", "stride_ih",
                "stride_cb", "stride_ch", "stride_btb")
        for a in ints + (("stride_bb", "stride_bh") if bias else ()):
            split[a] = "i32"
        # what the runtime specializes for 16-byte-aligned tensors and strides divisible by 16
        split_div = ("Q", "K", "V", "IDX", "CNT", "SEQ", "BT", "O_PART", "LSE_PART",
                     "stride_qb", "stride_qh", "stride_kb", "stride_ks", "stride_kh",
                     "stride_vb", "stride_vs", "stride_vh") + (("BIAS",) if bias else ())
        merge = {"O_PART": "*fp32", "LSE_PART": "*fp32", "OUT": dt, "num_splits": "i32",
                 "stride_ob": "i32", "stride_oh": "i32"}
        merge_div = ("O_PART", "LSE_PART", "OUT", "stride_ob", "stride_oh")
        return [("sparse_decode_split", split, split_div, self._kw_split),
                ("sparse_decode_merge", merge, merge_div, self._kw_merge)]

    def compile_sm90(self, keep_asm: bool = False) -> dict:
        """Compile both kernels for sm_90 with no GPU present. Returns per-kernel facts:
        shared memory (bytes), registers and local (spill) memory per thread read from the
        cubin, sizes of PTX and cubin; with keep_asm, the TTIR/TTGIR/PTX/cubin too.

        In a process whose triton was imported with TRITON_INTERPRET=1 (its own standard
        library then consists of interpreter functions that triton.compile cannot take), the
        compile runs in a subprocess without the interpreter (about 0.3 s extra)."""
        if _stdlib_interpreted():
            return self._compile_in_subprocess(keep_asm)
        return self._compile_here(keep_asm)

    def __getstate__(self):
        # picklable for the compile worker: no module object, no torch dtype
        return {**self.__dict__, "_module": None, "_dtype": None, "_kernels": None}

    def _compile_in_subprocess(self, keep_asm: bool) -> dict:
        env = {**os.environ, "TRITON_INTERPRET": "0",
               "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        with tempfile.TemporaryDirectory() as tmp:
            src, dst = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
            src.write_bytes(pickle.dumps({"adapter": self, "keep_asm": keep_asm}))
            proc = subprocess.run(
                [sys.executable, "-c", "import sys; from sparsegen.codegen.triton_decode "
                 "import _compile_worker; _compile_worker(sys.argv[1], sys.argv[2])",
                 str(src), str(dst)], env=env, capture_output=True, text=True, timeout=900)
            if not dst.exists():
                raise CompileError(f"compile worker failed (rc {proc.returncode}):\n"
                                   f"{proc.stderr[-3000:]}")
            result = pickle.loads(dst.read_bytes())
        if "error" in result:
            raise CompileError(result["error"])
        return result["facts"]

    def _compile_here(self, keep_asm: bool) -> dict:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        mod = _import_for_compile(self.render(interpret=False))
        target = GPUTarget("cuda", 90, 32)
        facts = {}
        for name, sig, div, kw in self._signatures():
            fn = getattr(mod, name)
            attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in div}
            src = ASTSource(fn, sig, constexprs={}, attrs=attrs)
            try:
                ck = triton.compile(src, target=target, options=dict(kw))
            except Exception as e:  # noqa: BLE001 - any compiler failure is a failed trial
                raise CompileError(f"{name} ({self.static}, {self.config}): "
                                   f"{type(e).__name__}: {e}") from e
            cubin = ck.asm.get("cubin", b"")
            facts[name] = {
                "shared": ck.metadata.shared,
                "num_warps": ck.metadata.num_warps,
                "ptx_bytes": len(ck.asm.get("ptx", "")),
                "cubin_bytes": len(cubin),
                **_resource_usage(cubin, name),
            }
            if keep_asm:
                facts[name]["asm"] = dict(ck.asm)
        return facts

    # --- runtime ---------------------------------------------------------------------------
    def num_splits(self, batch: int, kv_heads: int, max_selected: int, device=None) -> int:
        num_sms = H100_SMS if device is None else _num_sms(device)
        return split_count(batch, kv_heads, max_selected, num_sms, self.config["waves"],
                           self.config["min_blocks_per_split"])

    def __call__(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None):
        """out [B, Hq, D] in q's dtype; see decode_api for the contract. No device sync."""
        return self._launch(q, k, v, block_indices, block_counts, seq_lens, block_table,
                            sm_scale, num_splits)[0]

    def partials(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None, block_bias=None):
        """(out, o_part [B, Hq, num_splits, D] fp32, lse [B, Hq, num_splits] fp32): the split
        kernel's normalized partial outputs and base-2 log-sum-exps (of the scores times
        sm_scale * log2(e)); an empty split holds zeros and -inf. For tests and debugging."""
        return self._launch(q, k, v, block_indices, block_counts, seq_lens, block_table,
                            sm_scale, num_splits, block_bias)

    def _launch(self, q, k, v, block_indices, block_counts, seq_lens, block_table, sm_scale,
                num_splits, block_bias=None):
        """block_bias: [B, Hkv, max_sel] fp32, required when has_block_bias, else ignored."""
        torch = _torch()
        if self._kernels is None:
            self._prepare()
        s = self.static
        B, Hq, D = q.shape
        Hkv = k.shape[2]
        if D != s.head_dim or Hq != Hkv * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match head_dim="
                             f"{s.head_dim}, group_size={s.group_size}")
        if q.dtype != self._dtype or k.dtype != q.dtype or v.dtype != q.dtype:
            raise TypeError(f"q/k/v must be {s.dtype}; got {q.dtype}, {k.dtype}, {v.dtype}")
        qs, ks, vs = q.stride(), k.stride(), v.stride()
        if qs[2] != 1 or ks[3] != 1 or vs[3] != 1:
            raise ValueError("the last (head_dim) dimension of q, k and v must be contiguous")
        i32 = torch.int32
        if block_indices.dtype != i32 or block_counts.dtype != i32 or seq_lens.dtype != i32:
            raise TypeError("block_indices, block_counts and seq_lens must be int32")
        if self._paged:
            if block_table is None or block_table.dtype != i32:
                raise TypeError("the paged layout needs an int32 block_table [B, max_pages]")
            if k.shape[1] != s.page_size:
                raise ValueError(f"k has pages of {k.shape[1]} tokens; the kernel was built "
                                 f"for page_size={s.page_size}")
            bt = block_table
        else:
            bt = block_counts  # unused by the contiguous kernel
        if self.has_block_bias and (block_bias is None or block_bias.dtype != torch.float32
                                    or block_bias.shape != block_indices.shape):
            raise TypeError("this kernel was built with a block bias: pass block_bias, fp32, "
                            f"of shape {tuple(block_indices.shape)}")
        max_sel = block_indices.shape[2]
        dev = q.device
        if num_splits is None:
            num_splits = self.num_splits(B, Hkv, max_sel, dev)
        elif not 1 <= num_splits <= 65535:
            raise ValueError(f"num_splits={num_splits} out of [1, 65535]")
        scale = (self._default_scale if sm_scale is None else sm_scale) * LOG2E
        # one fp32 workspace: partial outputs [B, Hq, splits, D], then lse [B, Hq, splits]
        n = B * Hq * num_splits
        ws = torch.empty(n * (D + 1), dtype=torch.float32, device=dev)
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=dev)
        head = (q, k, v, block_indices, block_counts, seq_lens, bt)
        bis, bcs = block_indices.stride(), block_counts.stride()
        tail = (scale, num_splits, max_sel, qs[0], qs[1], ks[0], ks[1], ks[2], vs[0], vs[1],
                vs[2], bis[0], bis[1], bcs[0], bcs[1], bt.stride(0))
        if self.has_block_bias:  # BIAS follows BT, its strides follow stride_btb
            head += (block_bias,)
            tail += (block_bias.stride(0), block_bias.stride(1))
        os_ = out.stride()
        o_part = ws[:n * D].view(B, Hq, num_splits, D)
        lse = ws[n * D:].view(B, Hq, num_splits)
        split, merge = self._kernels
        split[(num_splits, Hkv, B)](*head, o_part, lse, *tail, **self._kw_split)
        merge[(Hq, B)](o_part, lse, out, num_splits, os_[0], os_[1], **self._kw_merge)
        return out, o_part, lse

    def _prepare(self):
        mod = self._module or self.module
        self._dtype = getattr(_torch(), _TORCH_DTYPES[self.static.dtype])
        self._kernels = (mod.sparse_decode_split, mod.sparse_decode_merge)


def _stdlib_interpreted() -> bool:
    import triton.language as tl
    from triton.runtime.jit import JITFunction
    return not isinstance(tl.cdiv, JITFunction)


def _compile_worker(job_path: str, result_path: str) -> None:
    """Entry point of the compile subprocess (see TritonSparseDecode.compile_sm90): unpickles
    the adapter (a subclass too) and compiles it here, without the interpreter."""
    job = pickle.loads(Path(job_path).read_bytes())
    try:
        result = {"facts": job["adapter"]._compile_here(job["keep_asm"])}
    except CompileError as e:
        result = {"error": str(e)}
    Path(result_path).write_bytes(pickle.dumps(result))


def _import_for_compile(path: Path):
    """The rendered module with real JITFunctions, also under TRITON_INTERPRET=1 (where
    @triton.jit would give InterpretedFunctions that triton.compile cannot take)."""
    import importlib.util

    from triton import knobs
    from triton.runtime.jit import JITFunction

    with knobs.runtime.scope():
        knobs.runtime.interpret = False
        mod = import_file(path)
        if not isinstance(mod.sparse_decode_split, JITFunction):  # imported while interpreting
            spec = importlib.util.spec_from_file_location(f"sparsegen_sm90_{path.stem}", path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
    return mod


def _torch():
    global _TORCH
    if _TORCH is None:
        import torch
        _TORCH = torch
    return _TORCH


_TORCH = None


def _patch_interpreter_index() -> None:
    """TRITON_INTERPRET=1 with NumPy >= 2.4: Triton 3.6's interpreter holds every scalar as a
    1-element array and turns it into a loop bound with int(array), which NumPy 2.4 rejects
    ("only 0-dimensional arrays can be converted to Python scalars"), so any loop over a
    runtime bound fails. Make the interpreter's tensor.__index__ take the single element."""
    from triton.runtime import interpreter as interp
    if getattr(interp, "_sparsegen_index_patched", False):
        return
    orig = interp._patch_lang_tensor

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__",
                       lambda self: int(self.handle.data.reshape(-1)[0]))

    interp._patch_lang_tensor = patched
    interp._sparsegen_index_patched = True


_RES_RE = re.compile(r"Function (\w+):\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)")


def _resource_usage(cubin: bytes, name: str) -> dict:
    """Registers, stack and local memory of `name` from `cuobjdump -res-usage` (shipped with
    Triton; works on a cached compile too, unlike the ptxas log). {} if unavailable."""
    try:
        import triton
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True,
                                  text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    for m in _RES_RE.finditer(text):
        if m.group(1) == name:
            return {"n_regs": int(m.group(2)), "stack": int(m.group(3)),
                    "local": int(m.group(5))}
    return {}
