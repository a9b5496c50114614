"""Triton page scoring of the milestone rule (RaaS), rendered from
templates/triton/milestone_score.py.j2: one launch scores every live decode page of every
sequence against the current query (Quest bound, softmax over pages per query head, mean
over heads). Same signature as sparsegen.methods.milestone.torch_page_scores, so it plugs
into MilestoneDecoder(scorer=...). Attention itself is the sparse decode kernel over the
kept pages (decode_api; sparsegen.codegen.backend.decode_backend).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .triton_decode import LOG2E
from .triton_kernel import TRITON_PTR, TritonKernel, check_int_config, pow2, torch_dtype


@dataclass(frozen=True)
class MilestoneStatic:
    head_dim: int
    group_size: int
    dtype: str = "bf16"  # of q and the page min/max

    @classmethod
    def from_spec(cls, spec, dtype: str | None = None) -> "MilestoneStatic":
        return cls(spec.model.head_dim, spec.model.group_size, dtype or spec.model.dtype)

    def as_dict(self) -> dict:
        return asdict(self)


def _g_pad(group: int) -> int:
    return max(16, 1 << (group - 1).bit_length())


class MilestoneScoreTriton(TritonKernel):
    name = "milestone_score"
    template = "triton/milestone_score.py.j2"

    @classmethod
    def tunable_space(cls, static) -> dict[str, list]:
        return {"slot_chunk": [16, 32, 64, 128], "num_warps": [1, 2, 4, 8]}

    @classmethod
    def default_config(cls, static) -> dict:
        return {"slot_chunk": 32, "num_warps": 8}

    @classmethod
    def check_config(cls, static, config) -> str | None:
        bad = check_int_config(config, ("slot_chunk", "num_warps"))
        if bad:
            return bad
        if not pow2(config["slot_chunk"]) or not 16 <= config["slot_chunk"] <= 256:
            return f"slot_chunk={config['slot_chunk']} must be a power of two in [16, 256]"
        # fp32 [chunk, D] min/max tiles feed FMA-based (ieee) dots; past 16 values per
        # thread ptxas hit its 255-register cap and spilled (sm_90, D 128)
        if config["slot_chunk"] * static.head_dim > 16 * 32 * config["num_warps"]:
            return "min/max tiles over 16 fp32 values per thread (register spills)"
        return None

    def template_params(self) -> dict:
        s = self.static
        return {"head_dim": s.head_dim, "group_size": s.group_size,
                "g_pad": _g_pad(s.group_size), "dtype": s.dtype, **self.config}

    def signatures(self):
        dt = TRITON_PTR[self.static.dtype]
        sig = {"Q": dt, "KMIN": dt, "KMAX": dt, "SLOT": "*i32", "OUT": "*fp32",
               "qk_scale": "fp32", "L": "i32",
               **{a: "i32" for a in ("stride_qb", "stride_qh", "stride_mp", "stride_mh",
                                     "stride_sb", "stride_ob", "stride_oh")}}
        return [("milestone_score", sig, ("Q", "KMIN", "KMAX", "SLOT", "OUT", "stride_qb",
                                          "stride_qh", "stride_mp", "stride_mh"),
                 {"num_warps": self.config["num_warps"], "num_stages": 1})]

    def __call__(self, q, kmin, kmax, slot_phys, sm_scale=None):
        """q [B, Hq, D]; kmin/kmax [pages, Hkv, D]; slot_phys [B, L] int32 (-1 empty) ->
        page scores [B, L] fp32 (0 for empty slots). No device sync."""
        s = self.static
        B, Hq, D = q.shape
        Hkv = kmin.shape[1]
        if D != s.head_dim or Hq != Hkv * s.group_size:
            raise ValueError(f"q {tuple(q.shape)} / kmin {tuple(kmin.shape)} do not match "
                             f"head_dim={s.head_dim}, group_size={s.group_size}")
        if q.dtype != torch_dtype(s.dtype) or kmin.dtype != q.dtype or kmax.dtype != q.dtype:
            raise TypeError(f"q, kmin and kmax must be {s.dtype}")
        if slot_phys.dtype != torch.int32 or kmin.stride() != kmax.stride():
            raise TypeError("slot_phys must be int32; kmin and kmax must share strides")
        L = slot_phys.shape[1]
        out = torch.empty(B, Hkv, L, dtype=torch.float32, device=q.device)
        scale = (D ** -0.5 if sm_scale is None else sm_scale) * LOG2E
        self.module.milestone_score[(Hkv, B)](
            q, kmin, kmax, slot_phys, out, scale, L,
            q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1), slot_phys.stride(0),
            out.stride(0), out.stride(1),
            num_warps=self.config["num_warps"], num_stages=1)
        return out.sum(1) / Hq
