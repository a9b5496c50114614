"""Triton kernels of the gate rule's decode scoring + selection.

`TritonGateScore` (templates/triton/gate_score.py.j2) computes the logits of the gate query
against the K-compression cache; `TritonBlockSelect` (shared with every rule) turns them into
block indices, by top-k on the logits (the softmax keeps their order) or by softmax
probability > threshold over the blocks strictly before the current one. `GateSelect` chains
the two with preallocated scratch, as the decode step uses them.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .select_kernels import SelectStatic, TritonBlockSelect
from .triton_kernel import (TRITON_PTR, TritonKernel, check_int_config, dtype_name, pow2,
                            torch_dtype)

_KEYS = ("block_j", "tiles", "num_stages", "num_warps")


@dataclass(frozen=True)
class GateScoreStatic:
    block_size: int
    d_gate: int
    dtype: str = "bf16"   # of the compression cache (q_gate is fp32)

    def __post_init__(self):
        if not pow2(self.block_size) or not pow2(self.d_gate):
            raise ValueError("block_size and d_gate must be powers of two")
        if self.dtype not in TRITON_PTR:
            raise ValueError(f"dtype {self.dtype!r} is not one of {tuple(TRITON_PTR)}")

    def as_dict(self) -> dict:
        return asdict(self)


class TritonGateScore(TritonKernel):
    name = "gate_score"
    template = "triton/gate_score.py.j2"

    @classmethod
    def tunable_space(cls, static: GateScoreStatic) -> dict[str, list]:
        return {"block_j": [8, 16, 32, 64, 128], "tiles": [1, 2, 4, 8, 16],
                "num_stages": [1, 2, 3, 4], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static: GateScoreStatic) -> dict:
        # H100, bf16, d_gate 128, B 16 x 128K: many small programs beat long pipelined ones
        return {"block_j": max(8, min(16, 1024 // static.d_gate)), "tiles": 4, "num_stages": 2,
                "num_warps": 2}

    @classmethod
    def check_config(cls, static: GateScoreStatic, config: dict) -> str | None:
        if reason := check_int_config(config, _KEYS):
            return reason
        bj = config["block_j"]
        if not pow2(bj) or not 1 <= bj <= 256:
            return f"block_j={bj} must be a power of two in [1, 256]"
        if bj * static.d_gate > 16384:
            return f"block_j x d_gate = {bj * static.d_gate} fp32 values exceed 16384 (spills)"
        if bj * static.d_gate < 32 * config["num_warps"]:
            return f"a {bj}x{static.d_gate} tile leaves threads idle at {config['num_warps']} warps"
        if not 1 <= config["tiles"] <= 64 or not 1 <= config["num_stages"] <= 6:
            return "tiles must lie in [1, 64] and num_stages in [1, 6]"
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"block_size": s.block_size, "d_gate": s.d_gate, "dtype": s.dtype,
                "block_j": c["block_j"], "tiles": c["tiles"], "num_stages": c["num_stages"],
                "num_warps": c["num_warps"]}

    def signatures(self):
        sig = {"QG": "*fp32", "KC": TRITON_PTR[self.static.dtype], "SEQ": "*i32",
               "OUT": "*fp32", "scale": "fp32"}
        for a in ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kj",
                  "stride_ob", "stride_oh"):
            sig[a] = "i32"
        return [("gate_score", sig, ("QG", "KC", "SEQ", "OUT"),
                 {"num_warps": self.config["num_warps"],
                  "num_stages": self.config["num_stages"]})]

    def __call__(self, q_gate, kc, seq_lens, out=None):
        """q_gate [B, Hkv, dg] fp32, kc [B, Hkv, max_blocks, dg] -> logits [B, Hkv,
        max_blocks] fp32 (entries past each sequence's blocks are left untouched)."""
        import torch

        B, H, NB, dg = kc.shape
        if dg != self.static.d_gate or q_gate.shape != (B, H, dg):
            raise ValueError(f"q_gate {tuple(q_gate.shape)} / kc {tuple(kc.shape)} do not "
                             f"match d_gate={self.static.d_gate}")
        if q_gate.dtype != torch.float32 or kc.dtype != torch_dtype(self.static.dtype):
            raise TypeError(f"q_gate must be fp32 and kc {self.static.dtype}")
        if q_gate.stride(2) != 1 or kc.stride(3) != 1:
            raise ValueError("the last dimension of q_gate and kc must be contiguous")
        if out is None:
            out = torch.empty(B, H, NB, dtype=torch.float32, device=kc.device)
        per = self.config["block_j"] * self.config["tiles"]
        self.module.gate_score[(triton_cdiv(NB, per), H, B)](
            q_gate, kc, seq_lens, out, 1.0 / math.sqrt(dg),
            q_gate.stride(0), q_gate.stride(1), kc.stride(0), kc.stride(1), kc.stride(2),
            out.stride(0), out.stride(1), num_warps=self.config["num_warps"],
            num_stages=self.config["num_stages"])
        return out

    # --- tuner protocol --------------------------------------------------------------------
    @classmethod
    def bench_inputs(cls, static: GateScoreStatic, batch: int, seq_len: int, heads: int = 8,
                     device="cuda", seed: int = 0) -> dict:
        import torch

        gen = torch.Generator(device=device).manual_seed(seed)
        nb = -(-seq_len // static.block_size)
        return {"q_gate": torch.randn(batch, heads, static.d_gate, device=device, generator=gen),
                "kc": torch.randn(batch, heads, nb, static.d_gate, device=device,
                                  generator=gen).to(torch_dtype(static.dtype)),
                "seq_lens": torch.full((batch,), seq_len, dtype=torch.int32, device=device)}

    def reference(self, q_gate, kc, seq_lens):
        from ..methods.gate import gate_logits_reference
        return gate_logits_reference(q_gate, kc, seq_lens, self.static.block_size)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GateSelect:
    """Gate scoring + selection of one decode step: two launches, no host sync."""

    def __init__(self, block_size: int, d_gate: int, kc_dtype, mode: str,
                 score_config: dict | None = None, select_config: dict | None = None,
                 build_dir=None):
        self.score = TritonGateScore(GateScoreStatic(block_size, d_gate, dtype_name(kc_dtype)),
                                     score_config, build_dir)
        self.select = TritonBlockSelect(SelectStatic(block_size, mode, 1, exclude_current=True),
                                        select_config, build_dir)

    def __call__(self, q_gate, kc, seq_lens, *, k=0, threshold=0.0, sink=0, local=1, width,
                 logits=None):
        logits = self.score(q_gate, kc, seq_lens, out=logits)
        return self.select(logits, seq_lens, k=k, threshold=threshold, sink=sink, local=local,
                           width=width)


@dataclass(frozen=True)
class GateStepStatic:
    """Compile-time shape of an AttnGate (see sparsegen.methods.gate.AttnGate)."""

    block_size: int
    head_dim: int
    group_size: int
    d_gate: int
    pooling: tuple = ("max", "min", "mean")
    rope: bool = True
    rmsnorm: bool = False
    query_reduction: str = "concat"
    eps: float = 1e-6
    dtype: str = "bf16"      # of the pre-RoPE q / k handed in
    kc_dtype: str = "bf16"   # of the compression cache

    def __post_init__(self):
        if not pow2(self.head_dim) or not pow2(self.d_gate) or self.d_gate < 32:
            raise ValueError("head_dim and d_gate must be powers of two, d_gate >= 32 (the "
                             "query projection is two tl.dots of d_gate / 2 columns)")
        if self.dtype not in TRITON_PTR or self.kc_dtype not in TRITON_PTR:
            raise ValueError(f"dtypes must be among {tuple(TRITON_PTR)}")
        object.__setattr__(self, "pooling", tuple(self.pooling))

    @classmethod
    def of(cls, gate, dtype: str, kc_dtype: str) -> "GateStepStatic":
        return cls(gate.block_size, gate.head_dim, gate.group, gate.d_gate, gate.pooling,
                   gate.rope, gate.rmsnorm, gate.query_reduction, gate.eps, dtype, kc_dtype)

    def as_dict(self) -> dict:
        return asdict(self)


class TritonGateStep(TritonKernel):
    """gate_query + gate_append (templates/triton/gate_step.py.j2)."""

    name = "gate_step"
    template = "triton/gate_step.py.j2"

    @classmethod
    def tunable_space(cls, static: GateStepStatic) -> dict[str, list]:
        return {"chunk_d": [8, 16, 32, 64], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static: GateStepStatic) -> dict:
        return {"chunk_d": 16, "num_warps": 4}

    @classmethod
    def check_config(cls, static: GateStepStatic, config: dict) -> str | None:
        if reason := check_int_config(config, ("chunk_d", "num_warps")):
            return reason
        cd = config["chunk_d"]
        if not pow2(cd) or cd > static.head_dim:
            return f"chunk_d={cd} must be a power of two <= head_dim={static.head_dim}"
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        return {"block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
                "d_gate": s.d_gate, "pooling": list(s.pooling), "rope": s.rope,
                "rmsnorm": s.rmsnorm, "query_reduction": s.query_reduction, "eps": s.eps,
                "chunk_d": c["chunk_d"], "num_warps": c["num_warps"]}

    def signatures(self):
        kw = {"num_warps": self.config["num_warps"], "num_stages": 1}
        dt, kt = TRITON_PTR[self.static.dtype], TRITON_PTR[self.static.kc_dtype]
        q = {"QN": dt, "WQ": "*fp32", "QNORM": "*fp32", "COS": "*fp32", "SIN": "*fp32",
             "SEQ": "*i32", "OUT": "*fp32"}
        for a in ("stride_qb", "stride_qh", "stride_ob", "stride_oh"):
            q[a] = "i32"
        a_ = {"KN": dt, "SEQ": "*i32", "RUN_MAX": "*fp32", "RUN_MIN": "*fp32",
              "RUN_SUM": "*fp32", "WK": "*fp32", "KNORM": "*fp32", "COS": "*fp32",
              "SIN": "*fp32", "KC": kt}
        for a in ("stride_kb", "stride_kh", "stride_sb", "stride_sh", "stride_cb", "stride_ch",
                  "stride_cj"):
            a_[a] = "i32"
        return [("gate_query", q, ("QN", "WQ", "OUT"), kw),
                ("gate_append", a_, ("KN", "RUN_MAX", "RUN_MIN", "RUN_SUM", "WK", "KC"), kw)]

    @staticmethod
    def _trig(gate, positions: int, device):
        from ..methods.gate import rope_table
        return rope_table(gate.rope_theta, gate.d_gate, positions, device)

    def _norms(self, gate):
        w = gate.q_weight
        return (gate.q_norm, gate.k_norm) if gate.rmsnorm else (w, w)  # unused when off

    def _check(self, gate, x):
        import torch

        if x.dtype != torch_dtype(self.static.dtype) or x.stride(-1) != 1:
            raise TypeError(f"q_nope / k_nope must be {self.static.dtype} with a contiguous "
                            "last dimension")
        for w in (gate.q_weight, gate.k_weight):
            if w.dtype != torch.float32 or not w.is_contiguous():
                raise TypeError("the gate's weights must be contiguous fp32")

    def query(self, gate, q_nope, seq_lens, capacity: int, out=None):
        """q_nope [B, Hq, D] (last dim contiguous) -> q_gate [B, Hkv, dg] fp32, rotated at
        position seq_len - 1 (< capacity)."""
        import torch

        self._check(gate, q_nope)
        B = q_nope.shape[0]
        H = gate.num_kv_heads
        if out is None:
            out = torch.empty(B, H, gate.d_gate, dtype=torch.float32, device=q_nope.device)
        cos, sin = self._trig(gate, capacity, q_nope.device)
        self.module.gate_query[(H, B)](
            q_nope, gate.q_weight.detach(), self._norms(gate)[0].detach(), cos, sin,
            seq_lens, out, q_nope.stride(0), q_nope.stride(1), out.stride(0), out.stride(1),
            num_warps=self.config["num_warps"], num_stages=1)
        return out

    def append(self, state, k_nope, seq_lens):
        """The Triton form of GateState.append: k_nope [B, Hkv, D] pre-RoPE."""
        gate = state.gate
        self._check(gate, k_nope)
        if state.kc.dtype != torch_dtype(self.static.kc_dtype):
            raise TypeError(f"the compression cache must be {self.static.kc_dtype}")
        B, H = k_nope.shape[:2]
        cos, sin = self._trig(gate, state.capacity, k_nope.device)
        self.module.gate_append[(H, B)](
            k_nope, seq_lens, state.run_max, state.run_min, state.run_sum,
            gate.k_weight.detach(), self._norms(gate)[1].detach(), cos, sin, state.kc,
            k_nope.stride(0), k_nope.stride(1), state.run_max.stride(0),
            state.run_max.stride(1), state.kc.stride(0), state.kc.stride(1), state.kc.stride(2),
            num_warps=self.config["num_warps"], num_stages=1)
