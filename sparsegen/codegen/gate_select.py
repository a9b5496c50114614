"""Triton adapter of the gate rule's fused scoring + selection (templates/triton/gate_select.py.j2).

One launch scores the K-compression cache against the gate query and selects the blocks
(top-k or softmax threshold, exactly sparsegen.methods.selection's choice), so the decode
step's selection chain loses the launch boundary between gate_score and block_select and the
logits are read back from L2 by the program that wrote them (or by the last of a row's
SPLITS programs). The selection half is block_select itself, rendered for this kernel's
selection keys and called from the fused kernel, so the two can never disagree.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .select_kernels import MODES, SelectStatic, TritonBlockSelect
from .triton_kernel import (TRITON_PTR, TritonKernel, check_int_config, pow2, torch_dtype)

_SCORE_KEYS = ("block_j", "num_stages", "splits")
_SELECT_KEYS = ("algo", "chunk", "radix_chunk", "num_warps")


@dataclass(frozen=True)
class GateSelectStatic:
    block_size: int
    d_gate: int
    mode: str = "topk"    # "topk" (token budget) | "softmax_threshold"
    dtype: str = "bf16"   # of the compression cache (q_gate is fp32)

    def __post_init__(self):
        if not pow2(self.block_size) or not pow2(self.d_gate):
            raise ValueError("block_size and d_gate must be powers of two")
        if self.dtype not in TRITON_PTR:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TRITON_PTR)}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not one of {MODES}")

    @property
    def select_static(self) -> SelectStatic:
        # the gate ranks only blocks strictly before the current one (always on instead)
        return SelectStatic(self.block_size, self.mode, 1, exclude_current=True)

    def as_dict(self) -> dict:
        return asdict(self)


class TritonGateSelect(TritonKernel):
    name = "gate_select"
    template = "triton/gate_select.py.j2"
    # the kernels this one renders and calls: their templates and adapters are part of
    # its tuning identity (an edit of block_select stales this kernel's winners too)
    depends_on = (TritonBlockSelect,)

    def __init__(self, static, config: dict | None = None, build_dir=None):
        super().__init__(static, config, build_dir)
        self.selector = TritonBlockSelect(static.select_static, self.select_config(self.config),
                                          build_dir)
        self._tickets: dict = {}   # device -> int32 [B * Hkv] row tickets, zero between calls
        self._logits: dict = {}    # device -> fp32 scratch rows when the caller gives none

    @staticmethod
    def select_config(config: dict) -> dict:
        return {k: config[k] for k in _SELECT_KEYS}

    @classmethod
    def tunable_space(cls, static: GateSelectStatic) -> dict[str, list]:
        return {"block_j": [8, 16, 32, 64], "num_stages": [1, 2, 3, 4],
                "splits": [1, 2, 4, 8, 16, 32],
                **TritonBlockSelect.tunable_space(static.select_static)}

    @classmethod
    def default_config(cls, static: GateSelectStatic) -> dict:
        # block_select's default selection (8 warps); 32-block tiles three ahead keep a
        # tile's row sums inside a warp at 8 warps and enough bytes in flight; 4 programs a
        # row keep Hkv x B = 64 rows (B 8) reading the cache at full bandwidth
        return {"block_j": 32, "num_stages": 3, "splits": 4,
                **TritonBlockSelect.default_config(static.select_static)}

    @classmethod
    def seed_configs(cls, static: GateSelectStatic) -> list[dict]:
        """The default at split counts 2-16 and with 64-block tiles: the split decides how
        much of the GPU reads the cache (Hkv x B rows x splits programs) and how long the
        row's last program waits, which a few sampled trials could miss."""
        base = cls.default_config(static)
        return [{**base, "splits": s, "block_j": bj} for bj in (32, 64) for s in (2, 4, 8, 16)]

    @classmethod
    def check_config(cls, static: GateSelectStatic, config: dict) -> str | None:
        if reason := check_int_config({k: v for k, v in config.items() if k != "algo"},
                                      tuple(k for k in _SCORE_KEYS + _SELECT_KEYS
                                            if k != "algo")):
            return reason
        if reason := TritonBlockSelect.check_config(static.select_static,
                                                    cls.select_config(config)):
            return reason
        bj, splits = config["block_j"], config["splits"]
        if not pow2(bj) or not 1 <= bj <= 256:
            return f"block_j={bj} must be a power of two in [1, 256]"
        if bj * static.d_gate > 16384:
            return f"block_j x d_gate = {bj * static.d_gate} fp32 values exceed 16384 (spills)"
        if bj < 2 * config["num_warps"]:
            # fewer rows than 2 a warp split each row's sum across warps (a shared-memory
            # reduction and barrier per tile: H100, 8-block tiles at 8 warps scored at
            # under half the bandwidth, bench/results/H100-gate-select-ab.md)
            return (f"block_j={bj} < 2 x num_warps={config['num_warps']}: a tile's row sums "
                    "would cross warps")
        if not 1 <= config["num_stages"] <= 6:
            return f"num_stages={config['num_stages']} must lie in [1, 6]"
        if not pow2(splits) or splits > 64:
            return f"splits={splits} must be a power of two <= 64"
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"block_size": s.block_size, "d_gate": s.d_gate, "dtype": s.dtype,
                "block_j": c["block_j"], "num_stages": c["num_stages"], "splits": c["splits"],
                "num_warps": c["num_warps"], "select_path": str(self.selector.render())}

    def signatures(self):
        sig = {"QG": "*fp32", "KC": TRITON_PTR[self.static.dtype], "SEQ": "*i32",
               "LOGITS": "*fp32", "IDX": "*i32", "CNT": "*i32", "TICKET": "*i32",
               "scale": "fp32", "k": "i32", "threshold": "fp32", "sink": "i32",
               "local": "i32", "width": "i32"}
        for a in ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kj",
                  "stride_lb", "stride_lh", "stride_ib", "stride_ih", "stride_cb", "stride_ch"):
            sig[a] = "i32"
        return [("gate_select", sig, ("QG", "KC", "SEQ", "LOGITS", "IDX", "CNT"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    # --- runtime ---------------------------------------------------------------------------
    def _scratch(self, cache: dict, shape: tuple, dtype, device, zero: bool):
        """A per-device buffer of at least `shape` elements, kept so a captured CUDA graph
        keeps its address (tickets are zero and the kernel leaves them zero)."""
        import torch

        key = str(device)
        buf = cache.get(key)
        n = math.prod(shape)
        if buf is None or buf.numel() < n:
            make = torch.zeros if zero else torch.empty
            buf = cache[key] = make(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    def __call__(self, q_gate, kc, seq_lens, *, k=0, threshold=0.0, sink=0, local=1, width,
                 logits=None, out=None):
        """q_gate [B, Hkv, dg] fp32, kc [B, Hkv, max_blocks, dg], seq_lens [B] int32 ->
        (block indices [B, Hkv, width] int32 ascending, -1 padded; counts [B, Hkv] int32).
        `logits` [B, Hkv, max_blocks] fp32: where the scores go (scratch; entries past each
        sequence's blocks are left untouched)."""
        import torch

        B, H, NB, dg = kc.shape
        s = self.static
        if dg != s.d_gate or q_gate.shape != (B, H, dg):
            raise ValueError(f"q_gate {tuple(q_gate.shape)} / kc {tuple(kc.shape)} do not "
                             f"match d_gate={s.d_gate}")
        if q_gate.dtype != torch.float32 or kc.dtype != torch_dtype(s.dtype):
            raise TypeError(f"q_gate must be fp32 and kc {s.dtype}")
        if q_gate.stride(2) != 1 or kc.stride(3) != 1:
            raise ValueError("the last dimension of q_gate and kc must be contiguous")
        if seq_lens.dtype != torch.int32 or seq_lens.shape != (B,):
            raise TypeError(f"seq_lens must be int32 [{B}]")
        if logits is None:
            logits = self._scratch(self._logits, (B, H, NB), torch.float32, kc.device, False)
        elif logits.shape != (B, H, NB) or logits.dtype != torch.float32 or \
                logits.stride(2) != 1:
            raise ValueError(f"logits must be fp32 [{B}, {H}, {NB}] with a contiguous last "
                             "dimension")
        if out is None:
            idx = torch.empty(B, H, width, dtype=torch.int32, device=kc.device)
            cnt = torch.empty(B, H, dtype=torch.int32, device=kc.device)
        else:
            idx, cnt = out
        tickets = self._scratch(self._tickets, (B * H,), torch.int32, kc.device, True)
        self.module.gate_select[(H, B, self.config["splits"])](
            q_gate, kc, seq_lens, logits, idx, cnt, tickets, 1.0 / math.sqrt(dg), int(k),
            float(threshold), int(sink), int(local), int(width),
            q_gate.stride(0), q_gate.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            logits.stride(0), logits.stride(1), idx.stride(0), idx.stride(1), cnt.stride(0),
            cnt.stride(1), num_warps=self.config["num_warps"], num_stages=1)
        return idx, cnt

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: GateSelectStatic, batch: int, seq_len: int, heads: int = 8,
                     budget_blocks: int = 64, device="cuda", seed: int = 0) -> dict:
        """A step at seq_len tokens. q_gate and the cache hold small integers, so every
        logit is exact whatever the kernel's summation order (the selection is compared
        with the reference exactly, ties and all: many logits tie)."""
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        nb = -(-seq_len // static.block_size)
        q = torch.randint(-3, 4, (batch, heads, static.d_gate), generator=gen, device=device)
        kc = torch.randint(-8, 9, (batch, heads, nb, static.d_gate), generator=gen,
                           device=device)
        if static.mode == "topk":
            threshold, k, width = 0.0, budget_blocks, min(nb, max(budget_blocks, 2))
        else:
            threshold, k, width = 2.0 / nb, 0, nb
        return {"q_gate": q.float(), "kc": kc.to(torch_dtype(static.dtype)),
                "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device),
                "k": k, "threshold": threshold, "sink": 1, "local": 1, "width": width}

    def reference(self, q_gate, kc, seq_lens, *, k=0, threshold=0.0, sink=0, local=1, width,
                  logits=None, out=None):
        from ..methods.gate import gate_logits_reference

        scores = gate_logits_reference(q_gate, kc, seq_lens, self.static.block_size)
        return self.selector.reference(scores, seq_lens, k=k, threshold=threshold, sink=sink,
                                       local=local, width=width)
