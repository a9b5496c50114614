"""TileLang backend of block-sparse GQA decode attention (templates/tilelang/sparse_decode.py.j2).

One rendered prim_func holds two kernels: split-KV attention over the selected blocks
(fp32 partial outputs + base-2 log-sum-exps) and the log-sum-exp merge. Batch, heads,
KV length / page count, max_sel and num_splits are TileLang dynamic dims (T.dynamic), so
one compiled kernel serves every shape of a (static, config) pair; kernels are cached
in-process per (static, config, arch).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .backend import CompileError, DecodeBackend
from .decode_api import DecodeStatic
from .render import render_and_import, render_to_file

SM90_TARGET = {"kind": "cuda", "arch": "sm_90a"}
MAX_SPLITS = 256          # split count the merge kernel is built for
SMEM_LIMIT = 227 * 1024   # opt-in shared memory per block on sm_90
SM_SMEM = 228 * 1024      # shared memory per SM on sm_90
MERGE_THREADS = 128
MIN_REGS = {True: 128, False: 80}  # per thread, by block_h == 64 (wgmma) or not (mma)
H100_SMS = 132            # split heuristic when no device is given
LOG2E = math.log2(math.e)
_TL_DTYPES = {"bf16": "bfloat16", "fp16": "float16"}

# Filled lazily: (static, config items, target arch) -> compiled JITKernel.
_KERNELS: dict[tuple, object] = {}
# TileLang execution backend of compiled kernels (tvm_ffi: the host function takes torch
# tensors through DLPack on torch's current stream, so CUDA-graph capture works)
EXEC_BACKEND = os.environ.get("SPARSEGEN_TILELANG_EXEC_BACKEND", "tvm_ffi")
_KERNELS_LOCK = threading.Lock()
_NUM_SMS: dict[int, int] = {}


class _LazyTorchDtypes(dict):
    def __missing__(self, key):
        import torch

        self.update(bf16=torch.bfloat16, fp16=torch.float16, fp32=torch.float32,
                    int32=torch.int32)
        return self[key]


_TORCH_DTYPES = _LazyTorchDtypes()


def _config_key(config: dict) -> tuple:
    return tuple(sorted(config.items()))


class TileLangSparseDecode(DecodeBackend):
    name = "tilelang"
    template = "tilelang/sparse_decode.py.j2"

    # --- tuning space (CPU only) -------------------------------------------------------
    @classmethod
    def tunable_space(cls, static: DecodeStatic) -> dict[str, list]:
        bs = static.block_size
        return {
            "block_n": [n for n in (16, 32, 64, 128) if n <= bs and bs % n == 0],
            "block_h": [h for h in (16, 32, 64) if h >= static.group_size],
            "threads": [128, 256],
            "num_stages": [1, 2, 3, 4],
            "warp_specialize": [True, False],
            "merge_chunk": [8, 16, 32],
            "min_blocks_per_sm": [1, 2, 3],
            "min_blocks_per_split": [1, 2, 4, 8],
            "waves": [1, 2, 3, 4],
        }

    @classmethod
    def default_config(cls, static: DecodeStatic) -> dict:
        # Measured on the H100 (bench/tilelang_smoke.py, Hq 32 / Hkv 8 / D 128 / block 64,
        # 128K, 90 % sparse): a 16-row tile (the GQA group padded to one MMA M; mma.sync, P
        # through shared memory) over 64-token steps, TMA loads from a producer warpgroup,
        # two stages, two CTAs per SM: 2.88 TB/s of selected KV at batch 16, 2.76 at batch 8,
        # ~1.7 at batch 1 (CUDA graph), vs 2.83 / 2.69 / 1.57 for a 64-row wgmma tile.
        block_n = min(64, static.block_size)
        return {
            "block_n": block_n,
            "block_h": 16 if block_n >= 32 else 32,  # 4 warps split N: >= 8 columns each
            "threads": 128,
            "num_stages": 2,
            "warp_specialize": True,
            "merge_chunk": 16,
            "min_blocks_per_sm": 2,
            "min_blocks_per_split": 2,
            "waves": 2,
        }

    @classmethod
    def smem_bytes(cls, static: DecodeStatic, config: dict) -> int:
        """Shared memory of the attention kernel: the Q tile, the K/V ring, the tail V tile,
        P (tiles under 64 rows) and TileLang's static part (mbarriers, reduction workspace);
        compile_sm90's dynamic_smem + static_smem match it."""
        esize = 2
        d = static.head_dim
        q = config["block_h"] * d * esize
        kv = config["num_stages"] * 2 * config["block_n"] * d * esize
        tail = config["block_n"] * d * esize
        p = config["block_h"] * config["block_n"] * esize if config["block_h"] < 64 else 0
        if config["block_h"] < 64:  # row reductions across warps use a shared workspace
            p += 1024 * (config["threads"] // 128)
        static_part = 2048 if config["warp_specialize"] else 1024
        return q + kv + tail + p + static_part

    @classmethod
    def check_config(cls, static: DecodeStatic, config: dict) -> str | None:
        need = ("block_n", "block_h", "threads", "num_stages", "warp_specialize", "merge_chunk",
                "min_blocks_per_sm", "min_blocks_per_split", "waves")
        missing = [k for k in need if k not in config]
        if missing:
            return f"missing config keys {missing}"
        unknown = sorted(set(config) - set(need))
        if unknown:
            return f"unknown config keys {unknown}"
        if static.dtype not in _TL_DTYPES:
            return f"dtype {static.dtype} is not supported by the TileLang kernel (bf16, fp16)"
        if static.head_dim not in (64, 128):
            return f"head_dim {static.head_dim} is not 64 or 128"
        if static.block_size not in (16, 32, 64, 128):
            return f"block_size {static.block_size} is not one of 16, 32, 64, 128"
        if not 1 <= static.group_size <= 16:
            return f"group_size {static.group_size} is outside 1..16"
        bn, bh = config["block_n"], config["block_h"]
        if bn not in (16, 32, 64, 128) or static.block_size % bn:
            return f"block_n {bn} must be 16/32/64/128 and divide block_size {static.block_size}"
        if bh not in (16, 32, 64):
            return f"block_h {bh} is not 16, 32 or 64 (MMA tile rows)"
        if bh < static.group_size:
            return f"block_h {bh} is smaller than the GQA group ({static.group_size} heads)"
        if config["threads"] not in (128, 256):
            return f"threads {config['threads']} is not 128 or 256"
        if config["threads"] == 256 and bh == 64:
            # seen on the H100 and reproduced by tests: with P kept in registers, two
            # consumer warpgroups give the QK^T accumulator and the PV operand conflicting
            # fragment layouts (smaller tiles stage P through shared memory and compile)
            return ("threads=256 with block_h=64 fails TileLang layout inference "
                    "(acc_s vs acc_s_cast); use 128 threads or a smaller block_h")
        # T.gemm(FullRow): each warp owns a multiple of 16 rows and of 8 columns
        warps = config["threads"] // 32
        warps_m = min(bh // 16, warps)
        warps_n = warps // warps_m
        if bn % (8 * warps_n):
            return (f"block_n {bn} cannot be split over {warps_n} warps for a {bh}-row tile "
                    f"(needs a multiple of {8 * warps_n})")
        if not 1 <= config["num_stages"] <= 4:
            return f"num_stages {config['num_stages']} is outside 1..4"
        if config["merge_chunk"] not in (8, 16, 32):
            return f"merge_chunk {config['merge_chunk']} is not 8, 16 or 32"
        if config["min_blocks_per_split"] < 1 or config["waves"] < 1:
            return "min_blocks_per_split and waves must be >= 1"
        if config["min_blocks_per_sm"] not in (1, 2, 3):
            return f"min_blocks_per_sm {config['min_blocks_per_sm']} is not 1, 2 or 3"
        launch = config["threads"] * (2 if config["warp_specialize"] else 1)  # + producer
        regs = 65536 // (config["min_blocks_per_sm"] * launch) // 8 * 8
        if regs < MIN_REGS[config["block_h"] == 64]:
            return (f"min_blocks_per_sm {config['min_blocks_per_sm']} leaves {regs} registers per "
                    f"thread ({launch} threads a block); the {'wgmma' if config['block_h'] == 64 else 'mma'}"
                    f" consumer needs {MIN_REGS[config['block_h'] == 64]} (ptxas fails below)")
        smem = cls.smem_bytes(static, config)
        if smem > SMEM_LIMIT:
            return f"shared memory {smem // 1024} KB exceeds the {SMEM_LIMIT // 1024} KB of a block"
        per_sm = config["min_blocks_per_sm"] * (smem + 1024)  # +1 KB the driver keeps per block
        if per_sm > SM_SMEM:
            return (f"min_blocks_per_sm {config['min_blocks_per_sm']} x {smem // 1024} KB of shared "
                    f"memory exceeds the {SM_SMEM // 1024} KB of an SM")
        return None

    # --- code generation -----------------------------------------------------------------
    def _params(self) -> dict:
        s, c = self.static, self.config
        return {
            "block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
            "dtype": s.dtype, "tl_dtype": _TL_DTYPES[s.dtype], "layout": s.layout,
            "page_size": s.page_size if s.layout == "paged" else 0,
            "block_n": c["block_n"], "block_h": c["block_h"], "threads": c["threads"],
            "num_stages": c["num_stages"], "warp_specialize": bool(c["warp_specialize"]),
            # TMA takes any 16-byte-aligned strides; the cp.async path only vectorises when
            # it can prove alignment, i.e. for compact tensors
            "strided_kv": bool(c["warp_specialize"]),
            "p_in_smem": c["block_h"] < 64,
            "p_buf": "P_shared" if c["block_h"] < 64 else "acc_s_cast",
            "merge_chunk": c["merge_chunk"], "merge_threads": MERGE_THREADS,
            "min_blocks_per_sm": c["min_blocks_per_sm"],
            "max_splits": MAX_SPLITS,
        }

    def render(self) -> Path:
        return render_to_file(self.template, self._params(), self.build_dir)

    def _module(self):
        return render_and_import(self.template, self._params(), self.build_dir)

    def compile_sm90(self) -> dict:
        """Lower and nvcc-compile for sm_90a on a machine without a GPU."""
        import tilelang
        from tilelang import tvm
        from tilelang.cuda.backend import tilelang_callback_cuda_compile

        t0 = time.perf_counter()
        mod = self._module()
        try:
            func = mod.build()
            target = tvm.target.Target(SM90_TARGET)
            with tvm.transform.PassContext(opt_level=3, config=mod.PASS_CONFIGS), target:
                art = tilelang.lower(func, target=SM90_TARGET)
                source = art.kernel_source
                dyn_smem = {}
                for gv, f in art.device_mod.functions.items():
                    if f.attrs is not None and "dyn_shared_memory_buf" in f.attrs:
                        dyn_smem[gv.name_hint] = int(f.attrs["dyn_shared_memory_buf"])
                t1 = time.perf_counter()
                cubin = tilelang_callback_cuda_compile(source, target, mod.PASS_CONFIGS)
        except Exception as e:  # TileLang/TVM/nvcc errors come in many types
            raise CompileError(_short_error(e)) from e
        t2 = time.perf_counter()
        names = re.findall(r'extern "C" __global__ void (?:__launch_bounds__\([^)]*\) )?(\w+)\(',
                           source)
        facts = {
            "kernel_names": sorted(set(names)),
            "cuda_source_chars": len(source),
            "cubin_bytes": len(cubin),
            "smem_estimate": self.smem_bytes(self.static, self.config),
            "dynamic_smem": dyn_smem,
            "uses_tma": "tma_load" in source,
            "uses_cp_async": "cp_async" in source,
            "uses_wgmma": "wgmma" in source,
            "lower_s": round(t1 - t0, 2),
            "nvcc_s": round(t2 - t1, 2),
        }
        facts.update(_resource_usage(bytes(cubin)))
        return facts

    # --- runtime ---------------------------------------------------------------------------
    def _kernel(self, device):
        """The launcher for `device`: TileLang's compiled host function when reachable (skips
        the JIT wrapper's per-call Python), else the JITKernel."""
        cached = self.__dict__.get("_bound")
        if cached is not None and cached[0] == device:
            return cached[1]
        kernel = self._compile_for(device)
        launch = kernel
        if EXEC_BACKEND == "tvm_ffi":
            get = getattr(getattr(kernel, "adapter", None), "_get_executable", None)
            if get is not None:
                launch = get()
        self._bound = (device, launch)
        return launch

    def _compile_for(self, device):
        import torch

        major, minor = torch.cuda.get_device_capability(device)
        arch = f"sm_{major}{minor}" + ("a" if major == 9 else "")
        key = (self.static, _config_key(self.config), arch, EXEC_BACKEND)
        kernel = _KERNELS.get(key)
        if kernel is None:
            with _KERNELS_LOCK:
                kernel = _KERNELS.get(key)
                if kernel is None:
                    import tilelang

                    mod = self._module()
                    try:
                        kernel = tilelang.compile(mod.build(), target={"kind": "cuda", "arch": arch},
                                                  execution_backend=EXEC_BACKEND,
                                                  pass_configs=mod.PASS_CONFIGS)
                    except Exception as e:
                        raise CompileError(_short_error(e)) from e
                    _KERNELS[key] = kernel
        return kernel

    def num_splits(self, batch: int, kv_heads: int, max_selected: int, device=None) -> int:
        """Splits per (batch, KV head) from shapes only (no device sync, CUDA-graph safe)."""
        num_sms = H100_SMS if device is None else _num_sms(device)
        return split_count(batch, kv_heads, max_selected, num_sms, self.config["waves"],
                           self.config["min_blocks_per_split"])

    def __call__(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None):
        """out [B, Hq, D] in q's dtype; see decode_api for the contract. No device sync."""
        return self._launch(q, k, v, block_indices, block_counts, seq_lens, block_table,
                            sm_scale, num_splits)[0]

    def partials(self, q, k, v, block_indices, block_counts, seq_lens, block_table=None,
                 sm_scale=None, num_splits=None):
        """(out, o_partial [B, Hq, num_splits, D] fp32, lse [B, Hq, num_splits] fp32): the
        split kernel's normalised partial outputs and base-2 log-sum-exps (of the logits times
        sm_scale * log2(e)); an empty split holds zeros and -inf. For tests and debugging."""
        return self._launch(q, k, v, block_indices, block_counts, seq_lens, block_table,
                            sm_scale, num_splits)

    def _launch(self, q, k, v, block_indices, block_counts, seq_lens, block_table, sm_scale,
                num_splits):
        import torch

        # Everything that depends only on shapes, dtypes and the device is checked and
        # computed once per signature; a repeat call costs two allocations and the launch.
        key = (q.shape, q.dtype, q.device, k.shape, k.dtype, block_indices.shape,
               block_indices.dtype, block_counts.dtype, seq_lens.dtype,
               None if block_table is None else block_table.dtype, num_splits)
        plan = self._plans.get(key) if "_plans" in self.__dict__ else None
        if plan is None:
            plan = self._plan(q, k, block_indices, block_counts, seq_lens, block_table,
                              num_splits)
            self.__dict__.setdefault("_plans", {})[key] = plan
        launch, B, Hq, D, ns, n_part, part_stride, lse_stride = plan
        if not self.config["warp_specialize"] and not (k.is_contiguous() and v.is_contiguous()):
            raise ValueError("this config (warp_specialize=False, cp.async loads) needs "
                             "contiguous k and v; the TMA configs take strided views")
        scale = (self._scale_log2 if sm_scale is None else float(sm_scale) * LOG2E)
        # one fp32 workspace: partial outputs, then the log-sum-exps
        ws = torch.empty(n_part + B * Hq * ns, dtype=torch.float32, device=q.device)
        o_partial = ws.as_strided((B, Hq, ns, D), part_stride)
        lse = ws.as_strided((B, Hq, ns), lse_stride, n_part)
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
        if block_table is None:
            launch(q, k, v, block_indices, block_counts, seq_lens, lse, o_partial, out, scale)
        else:
            launch(q, k, v, block_indices, block_counts, seq_lens, block_table, lse, o_partial,
                   out, scale)
        return out, o_partial, lse

    @property
    def _scale_log2(self) -> float:
        return self.static.head_dim ** -0.5 * LOG2E

    def _plan(self, q, k, block_indices, block_counts, seq_lens, block_table, num_splits):
        s = self.static
        if q.dim() != 3 or k.dim() != 4 or block_indices.dim() != 3:
            raise ValueError(f"q must be [B, Hq, D], k/v 4-d, block_indices [B, Hkv, max_sel]; "
                             f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(block_indices.shape)}")
        B, Hq, D = q.shape
        Hkv = k.shape[2]
        if q.dtype != _TORCH_DTYPES[s.dtype] or k.dtype != q.dtype:
            raise TypeError(f"q is {q.dtype}, k is {k.dtype}; the kernel was built for {s.dtype}")
        if D != s.head_dim or k.shape[3] != D or Hq != Hkv * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} do not match head_dim "
                             f"{s.head_dim} and group_size {s.group_size}")
        if (block_table is None) != (s.layout == "contiguous"):
            raise TypeError(f"layout {s.layout} {'needs' if block_table is None else 'takes no'} "
                            "block_table")
        if s.layout == "paged" and k.shape[1] != s.page_size:
            raise ValueError(f"pages hold {k.shape[1]} tokens; the kernel was built for "
                             f"page_size {s.page_size}")
        for name, t in (("block_indices", block_indices), ("block_counts", block_counts),
                        ("seq_lens", seq_lens), ("block_table", block_table)):
            if t is not None and t.dtype != _TORCH_DTYPES["int32"]:
                raise TypeError(f"{name} must be int32, got {t.dtype}")
        if num_splits is None:
            ns = self.num_splits(B, Hkv, block_indices.shape[-1], q.device)
        else:
            ns = max(1, min(int(num_splits), MAX_SPLITS))
        launch = self._kernel(q.device)
        n_part = B * Hq * ns * D
        return (launch, B, Hq, D, ns, n_part, (Hq * ns * D, ns * D, D, 1), (Hq * ns, ns, 1))


def split_count(batch: int, kv_heads: int, max_selected: int, num_sms: int, waves: int,
                min_blocks_per_split: int) -> int:
    """Splits per (batch, KV head): about `waves` programs per SM (waves ~ CTAs an SM holds
    at once), rounded *down* (programs do equal work, so one more program than fits would
    start a nearly empty second round), at least `min_blocks_per_split` blocks each, at most
    MAX_SPLITS."""
    rows = max(1, batch * kv_heads)
    want = max(1, (waves * num_sms) // rows)
    most = max(1, math.ceil(max_selected / max(1, min_blocks_per_split)))
    return max(1, min(want, most, MAX_SPLITS))


def _num_sms(device) -> int:
    import torch

    idx = torch.device(device).index
    if idx is None:
        idx = torch.cuda.current_device()
    n = _NUM_SMS.get(idx)
    if n is None:
        n = _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _short_error(e: Exception) -> str:
    """The compiler's message without TVM's C++ backtrace or the CUDA source."""
    text = str(e)
    if "Compilation error:" in text:  # nvcc: the source, then its diagnostics
        text = text.split("Compilation error:", 1)[1]
        keep = [ln for ln in text.splitlines()
                if "error" in ln or "fatal" in ln or ln.startswith("Command")]
        text = "nvcc failed:\n" + "\n".join(keep or text.splitlines()[-20:])
    lines = [ln for ln in text.splitlines()
             if ln.strip() and not ln.lstrip().startswith(("File \"<unknown>\"", "0x"))]
    msg = "\n".join(lines)
    if len(msg) > 4000:
        msg = msg[:1500] + "\n...\n" + msg[-2500:]
    return f"{type(e).__name__}: {msg}"


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton

        cand = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        return str(cand) if cand.exists() else None
    except ImportError:
        return None


def _resource_usage(cubin: bytes) -> dict:
    """Registers, spills and static shared memory per kernel (cuobjdump), when available."""
    tool = _cuobjdump()
    if not tool:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        try:
            res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                                 text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            return {}
    usage = {}
    current = None
    for line in res.stdout.splitlines():
        m = re.search(r"Function (\w+):", line)
        if m:
            current = m.group(1)
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and current:
            usage[current] = {"registers": int(m.group(1)), "stack": int(m.group(2)),
                              "static_smem": int(m.group(3)), "local": int(m.group(4))}
    return {"resources": usage} if usage else {}
