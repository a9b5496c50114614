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
from .triton_kernel import (TRITON_PTR, TritonKernel, cdiv, check_int_config, dtype_name, pow2,
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
        self.module.gate_score[(cdiv(NB, per), H, B)](
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
    """gate_query + gate_append (templates/triton/gate_step.py.j2).

    Both kernels run on a grid (Hkv, NT) with NT = d_gate / 2 / pairs: program (h, t) owns
    `pairs` output column pairs of head h for the whole batch (tiles of block_b rows), so each
    slice of the projection weights is read once per step and a head's weights are spread
    over NT programs. Self-resetting counters let the last program of a head finish what
    needs every column (RMSNorm) or every program's reads (the pools of the sequences whose
    block fills)."""

    name = "gate_step"
    template = "triton/gate_step.py.j2"
    _KEYS = ("pairs", "chunk_k", "block_b", "num_warps")
    REG_LIMIT = 176  # registers() budget: configs estimated at 192 spilled a little on sm_90

    def __init__(self, static, config: dict | None = None, build_dir=None):
        super().__init__(static, config, build_dir)
        self._cnt: dict = {}   # device -> int32 counters
        self._y: dict = {}     # device -> fp32 raw-key scratch (rmsnorm)

    @classmethod
    def tunable_space(cls, static: GateStepStatic) -> dict[str, list]:
        return {"pairs": [1, 2, 4, 8, 16], "chunk_k": [32, 64, 128, 256, 512],
                "block_b": [4, 8, 16, 32], "num_warps": [2, 4, 8]}

    @classmethod
    def default_config(cls, static: GateStepStatic) -> dict:
        # H100, Hkv 8, d_gate 128, B 16: 16 programs per head (128 in all, one wave on 132
        # SMs), the batch in one tile, 8 warps; smaller chunks / tiles where the registers
        # would not hold them (large head_dim or group)
        cfg = {"pairs": min(4, static.d_gate // 2), "chunk_k": 256, "block_b": 16,
               "num_warps": 8}
        while cls.check_config(static, cfg) and cfg["chunk_k"] > 32:
            cfg["chunk_k"] //= 2
        while cls.check_config(static, cfg) and cfg["block_b"] > 1:
            cfg["block_b"] //= 2
        return cfg

    @staticmethod
    def chunks(static: GateStepStatic, chunk_k: int) -> tuple[int, int, int]:
        """(rows of W_q[h], query chunk, append chunk): the query chunk is the largest power
        of two <= chunk_k dividing the rows; the append chunk min(chunk_k, head_dim)."""
        q_in = static.head_dim * (static.group_size if static.query_reduction == "concat"
                                  else 1)
        qc = chunk_k
        while q_in % qc:
            qc //= 2
        return q_in, qc, min(chunk_k, static.head_dim)

    @classmethod
    def registers(cls, static: GateStepStatic, config: dict) -> dict:
        """Rough fp32 registers a thread needs, per kernel: the raw loads of a batch tile
        (all issued up front) plus one chunk's product in the compute layout (every tile row
        in each thread). A model, calibrated on sm_90 compiles of many shapes and configs:
        none at or under REG_LIMIT spilled."""
        p, ck, bb, nw = (config[k] for k in cls._KEYS)
        t = 32 * nw
        eb = {"bf16": 2, "fp16": 2, "fp32": 4}[static.dtype]
        q_in, qc, ac = cls.chunks(static, ck)
        d, npool = static.head_dim, len(static.pooling)
        raw_q = (bb * d * static.group_size * eb + 8 * p * q_in) / (4 * t)  # q rows, W_q cols
        raw_a = (bb * d * (eb + 12) + 8 * p * npool * d) / (4 * t)  # k, 3 pools, W_k
        return {"gate_query": raw_q + bb * qc * 2 * p / t,
                "gate_append": raw_a + bb * ac * 2 * p / t}

    @classmethod
    def check_config(cls, static: GateStepStatic, config: dict) -> str | None:
        if reason := check_int_config(config, cls._KEYS):
            return reason
        p, ck, bb, nw = (config[k] for k in cls._KEYS)
        half = static.d_gate // 2
        if not pow2(p) or p > half:
            return f"pairs={p} must be a power of two <= d_gate / 2 = {half}"
        if not pow2(ck) or not 8 <= ck <= 1024:
            return f"chunk_k={ck} must be a power of two in [8, 1024]"
        if not pow2(bb) or bb > 64:
            return f"block_b={bb} must be a power of two <= 64"
        for name, regs in cls.registers(static, config).items():
            if regs > cls.REG_LIMIT:
                return (f"{name} would need ~{regs:.0f} registers a thread (> "
                        f"{cls.REG_LIMIT}: spills); "
                        "use a smaller block_b / chunk_k / pairs or more warps")
        return None

    def template_params(self) -> dict:
        s, c = self.static, self.config
        _, qc, ac = self.chunks(s, c["chunk_k"])
        return {"block_size": s.block_size, "head_dim": s.head_dim, "group_size": s.group_size,
                "d_gate": s.d_gate, "pooling": list(s.pooling), "rope": s.rope,
                "rmsnorm": s.rmsnorm, "query_reduction": s.query_reduction, "eps": s.eps,
                "pairs": c["pairs"], "chunk_k": c["chunk_k"], "q_chunk": qc, "a_chunk": ac,
                "block_b": c["block_b"], "num_warps": c["num_warps"]}

    def signatures(self):
        kw = {"num_warps": self.config["num_warps"], "num_stages": 1}
        dt, kt = TRITON_PTR[self.static.dtype], TRITON_PTR[self.static.kc_dtype]
        q = {"QN": dt, "WQ": "*fp32", "QNORM": "*fp32", "COS": "*fp32", "SIN": "*fp32",
             "SEQ": "*i32", "OUT": "*fp32", "CNT": "*i32", "B": "i32"}
        for a in ("stride_qb", "stride_qh", "stride_ob", "stride_oh"):
            q[a] = "i32"
        a_ = {"KN": dt, "SEQ": "*i32", "RUN_MAX": "*fp32", "RUN_MIN": "*fp32",
              "RUN_SUM": "*fp32", "WK": "*fp32", "KNORM": "*fp32", "COS": "*fp32",
              "SIN": "*fp32", "KC": kt, "Y": "*fp32", "CNT": "*i32", "B": "i32"}
        for a in ("stride_kb", "stride_kh", "stride_sb", "stride_sh", "stride_cb", "stride_ch",
                  "stride_cj", "stride_yb"):
            a_[a] = "i32"
        # what the runtime specializes for contiguous inputs (strides of 16-multiples)
        return [("gate_query", q, ("QN", "WQ", "OUT", "stride_qb", "stride_qh"), kw),
                ("gate_append", a_, ("KN", "RUN_MAX", "RUN_MIN", "RUN_SUM", "WK", "KC",
                                     "stride_kb", "stride_kh", "stride_sb", "stride_sh"), kw)]

    @property
    def programs_per_head(self) -> int:
        return self.static.d_gate // 2 // self.config["pairs"]

    @staticmethod
    def _trig(gate, positions: int, device):
        from ..methods.gate import rope_table
        return rope_table(gate.rope_theta, gate.d_gate, positions, device)

    def _norms(self, gate):
        w = gate.q_weight
        return (gate.q_norm, gate.k_norm) if gate.rmsnorm else (w, w)  # unused when off

    def _counters(self, device, heads: int, batch: int):
        """Zeroed int32 counters: gate_query's one per head ([:heads]), gate_append's one per
        head and batch tile (after them); the kernels leave them zero. Allocated once per
        device (and batch bound), so a captured CUDA graph keeps their address."""
        import torch

        need = heads * (1 + -(-batch // self.config["block_b"]))
        key = str(device)
        cnt = self._cnt.get(key)
        if cnt is None or cnt.numel() < need:
            cnt = self._cnt[key] = torch.zeros(need, dtype=torch.int32, device=device)
        return cnt

    def _raw_keys(self, state, batch: int, heads: int):
        """fp32 [B, Hkv, dg] scratch of the raw (pre-RMSNorm) gate keys (rmsnorm only)."""
        import torch

        if not self.static.rmsnorm:
            return state.run_sum  # never touched
        key = str(state.kc.device)
        y = self._y.get(key)
        if y is None or y.shape[0] < batch or y.shape[1:] != (heads, self.static.d_gate):
            y = self._y[key] = torch.empty(batch, heads, self.static.d_gate,
                                           dtype=torch.float32, device=state.kc.device)
        return y

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
        if out.stride(2) != 1:
            raise ValueError("the last dimension of out must be contiguous")
        cos, sin = self._trig(gate, capacity, q_nope.device)
        cnt = self._counters(q_nope.device, H, B)
        self.module.gate_query[(H, self.programs_per_head)](
            q_nope, gate.q_weight.detach(), self._norms(gate)[0].detach(), cos, sin,
            seq_lens, out, cnt, B, q_nope.stride(0), q_nope.stride(1), out.stride(0),
            out.stride(1), num_warps=self.config["num_warps"], num_stages=1)
        return out

    def append(self, state, k_nope, seq_lens):
        """The Triton form of GateState.append: k_nope [B, Hkv, D] pre-RoPE."""
        gate = state.gate
        self._check(gate, k_nope)
        if state.kc.dtype != torch_dtype(self.static.kc_dtype):
            raise TypeError(f"the compression cache must be {self.static.kc_dtype}")
        B, H = k_nope.shape[:2]
        cos, sin = self._trig(gate, state.capacity, k_nope.device)
        cnt = self._counters(k_nope.device, H, B)
        y = self._raw_keys(state, B, H)
        self.module.gate_append[(H, self.programs_per_head)](
            k_nope, seq_lens, state.run_max, state.run_min, state.run_sum,
            gate.k_weight.detach(), self._norms(gate)[1].detach(), cos, sin, state.kc, y,
            cnt[H:], B, k_nope.stride(0), k_nope.stride(1), state.run_max.stride(0),
            state.run_max.stride(1), state.kc.stride(0), state.kc.stride(1), state.kc.stride(2),
            y.stride(0), num_warps=self.config["num_warps"], num_stages=1)

    # --- tuner protocol --------------------------------------------------------------------
    def __call__(self, gate, state, q_nope, k_nope, seq_lens, pools=None):
        """One decode step's gate work as the decoder runs it (append, then query): folds
        k_nope [B, Hkv, D] into `state` (GateState; seq_lens counts the new token) and
        returns (q_gate [B, Hkv, dg] fp32, state.kc, state.run_max, state.run_min,
        state.run_sum). `pools` (run_max, run_min, run_sum) are the running pools the step
        starts from, copied in first, so a timed step can be replayed with the same result
        (the sum pool of a block that fills is not idempotent under repetition)."""
        import torch

        if pools is not None:
            dst = [state.run_max, state.run_min, state.run_sum]
            if hasattr(torch, "_foreach_copy_"):  # one launch for the three pools
                torch._foreach_copy_(dst, list(pools))
            else:
                for d, s in zip(dst, pools):
                    d.copy_(s)
        self.append(state, k_nope, seq_lens)
        q_gate = self.query(gate, q_nope, seq_lens, state.capacity)
        return q_gate, state.kc, state.run_max, state.run_min, state.run_sum

    @classmethod
    def bench_inputs(cls, static: GateStepStatic, batch: int, seq_len: int, heads: int = 8,
                     device="cuda", seed: int = 0) -> dict:
        """A decode step at ~seq_len tokens: lengths in (seq_len - block_size, seq_len], one
        sequence filling its block (projected into the compression cache) and one opening a
        block; the compression cache holds every earlier block, the running pools the
        current block's earlier keys (the previous block's at a block's first token)."""
        import torch

        from ..methods.gate import AttnGate, GateState

        s = static
        if seq_len < 1 or batch < 1:
            raise ValueError(f"batch={batch} and seq_len={seq_len} must be positive")
        gen = torch.Generator(device=device).manual_seed(seed)
        gate = AttnGate(heads * s.group_size, heads, s.head_dim, s.block_size, s.d_gate,
                        s.pooling, s.rope, s.rmsnorm, s.query_reduction, eps=s.eps).to(device)
        gate.reset_parameters(gen)
        if s.rmsnorm:
            with torch.no_grad():
                gate.q_norm.uniform_(0.5, 1.5, generator=gen)
                gate.k_norm.uniform_(0.5, 1.5, generator=gen)
        bs, dt = s.block_size, torch_dtype(s.dtype)
        lo = max(1, seq_len - bs + 1)
        lens = torch.randint(lo, seq_len + 1, (batch,), generator=gen, device=device)
        if seq_len >= bs:
            lens[0] = seq_len // bs * bs                          # fills its block
        if batch > 1:
            lens[1] = (seq_len - 1) // bs * bs + 1                # opens a block
        seq_lens = lens.to(torch.int32)
        state = GateState(gate, batch, seq_len, device, torch_dtype(s.kc_dtype))
        pos = seq_lens.long() - 1
        nb = state.kc.shape[2]
        past = torch.arange(nb, device=device)[None, :] < (pos // bs)[:, None]   # [B, NB]
        kc = torch.randn(state.kc.shape, generator=gen, device=device)
        state.kc.copy_(torch.where(past[:, None, :, None], kc, 0.0))
        # the current block's keys before the new one: pos % bs of them (a full old block
        # at a block's first token, whose pools the step overwrites)
        x = torch.randn(batch, bs, heads, s.head_dim, generator=gen, device=device).to(dt)
        n = torch.where(pos % bs == 0, bs, pos % bs)
        held = (torch.arange(bs, device=device)[None, :] < n[:, None])[:, :, None, None]
        xf = x.float()
        pools = (xf.masked_fill(~held, float("-inf")).amax(1),
                 xf.masked_fill(~held, float("inf")).amin(1),
                 xf.masked_fill(~held, 0.0).sum(1))
        for d, p in zip((state.run_max, state.run_min, state.run_sum), pools):
            d.copy_(p)
        return {"gate": gate, "state": state,
                "q_nope": torch.randn(batch, heads * s.group_size, s.head_dim, generator=gen,
                                      device=device).to(dt),
                "k_nope": torch.randn(batch, heads, s.head_dim, generator=gen,
                                      device=device).to(dt),
                "seq_lens": seq_lens, "pools": pools}

    def reference(self, gate, state, q_nope, k_nope, seq_lens, pools=None):
        """GateState.append and AttnGate.query (plain torch) on a copy of the state."""
        import copy

        import torch

        ref = copy.copy(state)
        ref.kc = state.kc.clone()
        src = pools if pools is not None else (state.run_max, state.run_min, state.run_sum)
        ref.run_max, ref.run_min, ref.run_sum = (t.clone() for t in src)
        with torch.no_grad():
            ref.append(k_nope.float(), seq_lens)
            q_gate = gate.query(q_nope.float(), seq_lens.long() - 1)
        return q_gate, ref.kc, ref.run_max, ref.run_min, ref.run_sum
