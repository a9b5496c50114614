"""The `gate` rule (SeerAttention-R, arXiv 2506.08889): AttnGate, its K-compression cache and
the plain-torch reference of gate scoring.

Per KV head, the keys of each block (pre-RoPE, as in the paper's code) are pooled max / min /
mean over the block's tokens, concatenated, projected to d_gate, optionally RMS-normalised and
rotated by the gate's own RoPE at the position of the block's FIRST token. The query side
reduces the G query heads of the group (pre-RoPE; concatenated or averaged), projects them to
one d_gate vector per KV head, normalises and rotates it at the query's position. Scores are
q_gate . k_gate / sqrt(d_gate), softmaxed over the blocks strictly before the query's block.

The first-token position holds in training (`AttnGate.forward`), prefill (`GateState.extend`)
and decode (`GateState.append`); the public decode cache rotates a block at its last token
while training uses the first, which shifts every gate key by block_size - 1 positions at
inference. tests/test_gate.py checks all three paths against each other.
"""
from __future__ import annotations

import math

import torch
from torch import nn

POOLINGS = ("max", "min", "mean")


# --- RoPE of the gate (rotate-half convention, fp32) ----------------------------------------
def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """cos, sin [..., dim] for integer positions [...]."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)
                         / dim)
    ang = positions.to(torch.float64)[..., None] * inv_freq  # fp64 angles: exact at 128K
    ang = torch.cat([ang, ang], -1)
    return ang.cos().float(), ang.sin().float()


_ROPE_TABLES: dict = {}


def rope_table(theta: float, dim: int, length: int, device) -> tuple:
    """cos, sin [length, dim // 2] fp32 of positions 0..length-1 (rope_cos_sin's values),
    shared by every layer with the same theta and dim; the gate kernels index it by
    position instead of evaluating fp64 trigonometry per step."""
    key = (float(theta), dim, str(device))
    table = _ROPE_TABLES.get(key)
    if table is None or table[0].shape[0] < length:
        n = max(length, 2 * table[0].shape[0] if table is not None else length)
        cos, sin = rope_cos_sin(torch.arange(n, device=device), dim, theta)
        table = _ROPE_TABLES[key] = (cos[:, : dim // 2].contiguous(),
                                     sin[:, : dim // 2].contiguous())
    return table


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


class AttnGate(nn.Module):
    """The trainable gate of one layer. All math in fp32; parameters are the only state."""

    def __init__(self, num_q_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                 d_gate: int = 128, pooling=POOLINGS, rope: bool = True, rmsnorm: bool = False,
                 query_reduction: str = "concat", rope_theta: float = 10000.0,
                 eps: float = 1e-6):
        super().__init__()
        if num_q_heads % num_kv_heads:
            raise ValueError(f"{num_q_heads} query heads do not group over {num_kv_heads}")
        if any(p not in POOLINGS for p in pooling) or not pooling:
            raise ValueError(f"pooling {pooling} must list some of {POOLINGS}")
        if query_reduction not in ("concat", "mean"):
            raise ValueError(f"query_reduction {query_reduction!r} is not concat or mean")
        if rope and d_gate % 2:
            raise ValueError(f"d_gate={d_gate} must be even for RoPE")
        self.num_q_heads, self.num_kv_heads, self.head_dim = num_q_heads, num_kv_heads, head_dim
        self.group = num_q_heads // num_kv_heads
        self.block_size, self.d_gate, self.pooling = block_size, d_gate, tuple(pooling)
        self.rope, self.rmsnorm, self.query_reduction = rope, rmsnorm, query_reduction
        self.rope_theta, self.eps = float(rope_theta), eps
        q_in = head_dim * (self.group if query_reduction == "concat" else 1)
        self.q_weight = nn.Parameter(torch.empty(num_kv_heads, q_in, d_gate))
        self.k_weight = nn.Parameter(torch.empty(num_kv_heads, head_dim * len(self.pooling),
                                                 d_gate))
        if rmsnorm:
            self.q_norm = nn.Parameter(torch.ones(d_gate))
            self.k_norm = nn.Parameter(torch.ones(d_gate))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Xavier-uniform per KV head, as the paper's code initialises its per-head linears
        for w in (self.q_weight, self.k_weight):
            bound = math.sqrt(6.0 / (w.shape[1] + w.shape[2]))
            with torch.no_grad():
                w.uniform_(-bound, bound, generator=generator)

    @classmethod
    def from_spec(cls, spec, num_q_heads=None, num_kv_heads=None, head_dim=None) -> "AttnGate":
        m, s = spec.model, spec.selection
        g = s.gate
        return cls(num_q_heads or m.num_q_heads, num_kv_heads or m.num_kv_heads,
                   head_dim or m.head_dim, s.block_size, d_gate=g.d_gate, pooling=g.pooling,
                   rope=g.rope, rmsnorm=g.rmsnorm, query_reduction=g.query_reduction,
                   rope_theta=m.rope_theta)

    def config(self) -> dict:
        """Everything needed to rebuild the module (saved beside the weights)."""
        return {"num_q_heads": self.num_q_heads, "num_kv_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "block_size": self.block_size,
                "d_gate": self.d_gate, "pooling": list(self.pooling), "rope": self.rope,
                "rmsnorm": self.rmsnorm, "query_reduction": self.query_reduction,
                "rope_theta": self.rope_theta, "eps": self.eps}

    # --- the two projections -------------------------------------------------------------
    def query(self, q_nope: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q_nope [..., Hq, D] (pre-RoPE), positions [...] -> gate queries [..., Hkv, dg]."""
        q = q_nope.float().unflatten(-2, (self.num_kv_heads, self.group))  # [..., Hkv, G, D]
        q = q.flatten(-2) if self.query_reduction == "concat" else q.mean(-2)
        q = torch.einsum("...hi,hio->...ho", q, self.q_weight)
        if self.rmsnorm:
            q = rms_norm(q, self.q_norm, self.eps)
        if self.rope:
            cos, sin = rope_cos_sin(positions, self.d_gate, self.rope_theta)
            q = apply_rope(q, cos[..., None, :], sin[..., None, :])
        return q

    def compress(self, stats: dict, block_ids: torch.Tensor) -> torch.Tensor:
        """Pooled block keys {max, min, mean: [..., Hkv, D]} of blocks `block_ids` [...] ->
        gate keys [..., Hkv, dg], rotated at each block's first token."""
        x = torch.cat([stats[p].float() for p in self.pooling], -1)
        k = torch.einsum("...hi,hio->...ho", x, self.k_weight)
        if self.rmsnorm:
            k = rms_norm(k, self.k_norm, self.eps)
        if self.rope:
            cos, sin = rope_cos_sin(block_ids * self.block_size, self.d_gate, self.rope_theta)
            k = apply_rope(k, cos[..., None, :], sin[..., None, :])
        return k

    def compress_blocks(self, k_nope: torch.Tensor) -> torch.Tensor:
        """k_nope [B, S, Hkv, D] -> gate keys of its full blocks [B, S // bs, Hkv, dg]."""
        B, S, H, D = k_nope.shape
        nf = S // self.block_size
        blocks = k_nope[:, :nf * self.block_size].float().view(B, nf, self.block_size, H, D)
        stats = pool_blocks(blocks)
        ids = torch.arange(nf, device=k_nope.device).expand(B, nf)
        return self.compress(stats, ids)

    def forward(self, q_nope: torch.Tensor, k_nope: torch.Tensor) -> torch.Tensor:
        """Training path. q_nope [B, S, Hq, D], k_nope [B, S, Hkv, D] (pre-RoPE) -> logits
        [B, Hkv, S, NB] (NB = ceil(S / bs)), -inf where block j is not strictly before the
        query's block (a row in block 0 is all -inf)."""
        qg, kg = self.gate_qk(q_nope, k_nope)
        S = q_nope.shape[1]
        return block_logits(qg, kg, 0, self.block_size, -(-S // self.block_size))

    def gate_qk(self, q_nope: torch.Tensor, k_nope: torch.Tensor):
        """The gate queries of every row [B, S, Hkv, dg] and gate keys of the full blocks
        [B, S // bs, Hkv, dg] (linear in S; the logits are block_logits of them)."""
        B, S = q_nope.shape[:2]
        pos = torch.arange(S, device=q_nope.device).expand(B, S)
        return self.query(q_nope, pos), self.compress_blocks(k_nope)


def block_logits(qg: torch.Tensor, kg: torch.Tensor, row_start: int, block_size: int,
                 num_blocks: int) -> torch.Tensor:
    """Gate logits of query rows [row_start, row_start + n) over key blocks [0, num_blocks):
    qg [B, n, Hkv, dg] (the rows' gate queries), kg [B, NBf, Hkv, dg] (full-block gate keys)
    -> [B, Hkv, n, num_blocks], -inf where block j is not strictly before the row's block."""
    n, nk = qg.shape[1], min(num_blocks, kg.shape[1])
    logits = torch.einsum("bshd,bjhd->bhsj", qg, kg[:, :nk]) / math.sqrt(qg.shape[-1])
    logits = torch.nn.functional.pad(logits, (0, num_blocks - nk), value=float("-inf"))
    t = torch.arange(row_start, row_start + n, device=qg.device)
    earlier = torch.arange(num_blocks, device=qg.device)[None, :] < (t // block_size)[:, None]
    return logits.masked_fill(~earlier, float("-inf"))


def pool_blocks(blocks: torch.Tensor) -> dict:
    """blocks [..., bs, Hkv, D] -> {max, min, mean} over the block's tokens, fp32."""
    x = blocks.float()
    return {"max": x.amax(-3), "min": x.amin(-3), "mean": x.sum(-3) / x.shape[-3]}


class GateState:
    """The K-compression cache of one layer and the running pool of each sequence's current
    (partial) block.

    kc [B, Hkv, max_blocks, dg] holds the gate key of every full block; it gains an entry in
    the step that fills a block (and prefill fills it in one pass). The running pool
    (max, min and sum of the current block's pre-RoPE keys, fp32 [B, Hkv, D] each) is
    O(1) per sequence, so no pre-RoPE keys are kept.
    """

    def __init__(self, gate: AttnGate, batch: int, capacity: int, device="cpu",
                 dtype=torch.float32):
        self.gate, self.batch, self.capacity = gate, batch, capacity
        self.block_size = gate.block_size
        max_blocks = -(-capacity // self.block_size)
        H, D = gate.num_kv_heads, gate.head_dim
        self.kc = torch.zeros(batch, H, max_blocks, gate.d_gate, dtype=dtype, device=device)
        self.run_max = torch.full((batch, H, D), float("-inf"), device=device)
        self.run_min = torch.full((batch, H, D), float("inf"), device=device)
        self.run_sum = torch.zeros(batch, H, D, device=device)

    @torch.no_grad()
    def extend(self, b: int, k_nope: torch.Tensor, start: int) -> None:
        """Sequence b gained tokens [start, start + n) with pre-RoPE keys k_nope [n, Hkv, D]
        (prefill, or a chunk of it). Host-driven: lengths are known on the host."""
        bs, n = self.block_size, k_nope.shape[0]
        x = k_nope.float()
        pos, i = start, 0
        if pos % bs:  # finish the partial block the sequence already has
            take = min(bs - pos % bs, n)
            self._merge(b, x[:take])
            pos, i = pos + take, take
            if pos % bs == 0:
                self._emit(b, pos // bs - 1)
        nf = (n - i) // bs
        if nf:
            blocks = x[i:i + nf * bs].view(nf, bs, *x.shape[1:])
            ids = torch.arange(pos // bs, pos // bs + nf, device=x.device)
            entries = self.gate.compress(pool_blocks(blocks), ids)        # [nf, Hkv, dg]
            self.kc[b, :, ids] = entries.transpose(0, 1).to(self.kc.dtype)
            i += nf * bs
            pos += nf * bs
        if i < n:  # a new partial block
            self._reset(b)
            self._merge(b, x[i:])

    def _reset(self, b: int) -> None:
        self.run_max[b] = float("-inf")
        self.run_min[b] = float("inf")
        self.run_sum[b] = 0.0

    def _merge(self, b: int, x: torch.Tensor) -> None:
        self.run_max[b] = torch.maximum(self.run_max[b], x.amax(0))
        self.run_min[b] = torch.minimum(self.run_min[b], x.amin(0))
        self.run_sum[b] = self.run_sum[b] + x.sum(0)

    def _emit(self, b: int, block: int) -> None:
        stats = {"max": self.run_max[b], "min": self.run_min[b],
                 "mean": self.run_sum[b] / self.block_size}
        ids = torch.tensor(block, device=self.kc.device)
        self.kc[b, :, block] = self.gate.compress(stats, ids).to(self.kc.dtype)

    @torch.no_grad()
    def append(self, k_nope: torch.Tensor, seq_lens: torch.Tensor) -> None:
        """Decode: one new pre-RoPE key per sequence, k_nope [B, Hkv, D]; seq_lens [B] counts
        it already. Vectorised over the batch with no host sync (CUDA-graph safe): every
        sequence's candidate entry is projected and written only where a block just filled."""
        bs = self.block_size
        pos = seq_lens.long() - 1
        x = k_nope.float()
        first = (pos % bs == 0)[:, None, None]
        # in place: a captured CUDA graph keeps these addresses
        self.run_max.copy_(torch.where(first, x, torch.maximum(self.run_max, x)))
        self.run_min.copy_(torch.where(first, x, torch.minimum(self.run_min, x)))
        self.run_sum.copy_(torch.where(first, x, self.run_sum + x))
        full = pos % bs == bs - 1
        blk = pos // bs
        stats = {"max": self.run_max, "min": self.run_min, "mean": self.run_sum / bs}
        entry = self.gate.compress(stats, blk).to(self.kc.dtype)          # [B, Hkv, dg]
        rows = torch.arange(self.batch, device=x.device)
        old = self.kc[rows, :, blk]
        self.kc[rows, :, blk] = torch.where(full[:, None, None], entry, old)


# --- plain-torch method reference of scoring -------------------------------------------------
def scored_blocks(seq_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Blocks strictly before the current token's block: (seq_len - 1) // bs, [B] int64."""
    return ((seq_lens.long() - 1).clamp(min=0)) // block_size


def gate_logits_reference(q_gate: torch.Tensor, kc: torch.Tensor, seq_lens: torch.Tensor,
                          block_size: int) -> torch.Tensor:
    """q_gate [B, Hkv, dg], kc [B, Hkv, NB, dg] -> logits [B, Hkv, NB] fp32: q.k/sqrt(dg)
    for the scored blocks, -inf elsewhere (the current block is always on instead)."""
    scale = 1.0 / math.sqrt(q_gate.shape[-1])  # the constant the kernel multiplies by
    logits = (q_gate.float()[:, :, None, :] * kc.float()).sum(-1) * scale
    j = torch.arange(kc.shape[2], device=kc.device)
    scored = j[None, :] < scored_blocks(seq_lens, block_size)[:, None]
    return logits.masked_fill(~scored[:, None, :], float("-inf"))


# --- gate weights on disk ---------------------------------------------------------------------
GATES_FORMAT = "sparsegen-gates-1"


def save_gates(path, gates: dict, metadata: dict | None = None) -> None:
    """Write {layer: AttnGate} to `path`: safetensors for a .safetensors name (bit-exact,
    no pickle), torch.save otherwise. The gates' config travels in the metadata."""
    import json
    from pathlib import Path

    tensors = {f"layers.{i}.{name}": t.detach().cpu().contiguous()
               for i, g in sorted(gates.items()) for name, t in g.state_dict().items()}
    meta = {"format": GATES_FORMAT, "layers": json.dumps(sorted(int(i) for i in gates)),
            "config": json.dumps(next(iter(gates.values())).config() if gates else {})}
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(tensors, str(path), metadata=meta)
    else:
        torch.save({"tensors": tensors, "metadata": meta}, path)


def load_gates(path, device="cpu") -> tuple[dict, dict]:
    """({layer: AttnGate}, metadata) from a file written by save_gates."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such gate file (`sparsegen distill --out` writes "
                                "one)")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        else:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(blob, dict):
                raise TypeError(f"holds a {type(blob).__name__}, not a dict")
            tensors, meta = blob["tensors"], blob["metadata"]
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        raise ValueError(f"{path} is not a sparsegen gate file (it does not read as one: "
                         f"{type(e).__name__}); `sparsegen distill --out` writes them") from e
    if not isinstance(meta, dict) or meta.get("format") != GATES_FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} is not a sparsegen gate file (format {fmt!r})")
    config = json.loads(meta["config"])
    gates = {}
    for layer in json.loads(meta["layers"]):
        gate = AttnGate(**config)
        prefix = f"layers.{layer}."
        gate.load_state_dict({k[len(prefix):]: v for k, v in tensors.items()
                              if k.startswith(prefix)})
        gates[layer] = gate.to(device)
    return gates, meta
