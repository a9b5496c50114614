"""Gate self-distillation: the target kernel against the plain-torch reference, the reference
against a direct reading of the definition (whole sequence and row ranges), the KL loss, the
row-chunked loss against the whole-sequence one (values and gradients; no [S, NB] tensor on the
chunked path), and `sparsegen distill` on tiny random-weight Llama / Qwen2 / Qwen3 models (loss
falls; saved gates reload bit-exactly)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse

import pytest
import torch

from sparsegen.codegen.distill_kernels import DistillStatic, TritonDistillTarget
from sparsegen.methods import distill
from sparsegen.methods.distill import (
    default_chunk_rows,
    distill_target_reference,
    gate_distill_loss,
    gate_kl_loss,
)
from sparsegen.methods.gate import AttnGate, load_gates, save_gates
from sparsegen.spec import parse_spec
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter


def brute_force_target(q, k, bs, scale):
    """The definition, one query row at a time, in fp64."""
    B, S, Hq = q.shape[:3]
    Hkv = k.shape[2]
    G = Hq // Hkv
    nb = -(-S // bs)
    out = torch.zeros(B, Hkv, S, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(Hkv):
            for t in range(S):
                if t < bs:
                    continue
                row = torch.zeros(nb, dtype=torch.float64)
                for g in range(G):
                    logits = q[b, t, h * G + g].double() @ k[b, : t + 1, h].double().T * scale
                    p = torch.softmax(logits, 0)
                    for j in range(t // bs):
                        row[j] = max(row[j], p[j * bs:(j + 1) * bs].max())
                out[b, h, t] = row / row.sum()
    return out


def test_reference_matches_the_definition():
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 45, 4, 16, generator=gen) * 2, torch.randn(1, 45, 2, 16, generator=gen)
    got = distill_target_reference(q, k, 16, 0.3, chunk=20, compute_dtype=torch.float64)
    torch.testing.assert_close(got.double(), brute_force_target(q, k, 16, 0.3))


@needs_interp
@pytest.mark.parametrize("bs,G,S,dtype", [(16, 1, 77, torch.float32), (32, 3, 150, torch.float32),
                                          (16, 4, 130, torch.float16), (64, 8, 200, torch.float32),
                                          (128, 2, 300, torch.float16)])
def test_kernel_matches_reference(bs, G, S, dtype):
    gen = torch.Generator().manual_seed(bs + G)
    q = (torch.randn(2, S, 2 * G, 64, generator=gen) * 1.5).to(dtype)
    k = torch.randn(2, S, 2, 64, generator=gen).to(dtype)
    name = "fp32" if dtype == torch.float32 else "fp16"
    kern = TritonDistillTarget(DistillStatic(bs, 64, G, name))
    got = kern(q, k)
    want = distill_target_reference(q, k, bs, compute_dtype=torch.float64)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    sums = got.sum(-1)
    assert torch.all(sums[:, :, :bs] == 0)                           # no earlier block
    torch.testing.assert_close(sums[:, :, bs:], torch.ones_like(sums[:, :, bs:]))


@needs_interp
def test_kernel_takes_strided_views():
    """Hugging Face hands over q, k as [B, H, S, D]; the kernel reads the transposed views."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 70, 64, generator=gen)
    k = torch.randn(1, 2, 70, 64, generator=gen)
    kern = TritonDistillTarget(DistillStatic(16, 64, 2, "fp32"))
    got = kern(q.transpose(1, 2), k.transpose(1, 2), sm_scale=0.2)
    want = distill_target_reference(q.transpose(1, 2), k.transpose(1, 2), 16, 0.2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kl_loss():
    gen = torch.Generator().manual_seed(1)
    target = torch.softmax(torch.randn(2, 3, 5, generator=gen), -1)
    target[0, 0] = 0.0                                               # a row with no block
    target[1, 2, 3:] = 0.0
    target[1, 2] /= target[1, 2].sum()
    logits = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    masked = logits.masked_fill(torch.arange(5) >= 4, float("-inf"))
    masked = torch.where(target.sum(-1, keepdim=True) > 0, masked, float("-inf"))
    loss = gate_kl_loss(masked, target)
    logq = torch.log_softmax(masked.detach(), -1)
    want = sum((t[t > 0] * (t[t > 0].log() - lq[t > 0])).sum()
               for t, lq in zip(target.view(-1, 5), logq.view(-1, 5))) / 5
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert torch.isfinite(logits.grad).all() and torch.all(logits.grad[0, 0] == 0)
    perfect = gate_kl_loss(torch.log(target.clamp(min=1e-30)), target)
    assert abs(float(perfect)) < 1e-6


def test_training_logits_only_see_earlier_blocks():
    gate = AttnGate(4, 2, 64, 16, d_gate=32)
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 50, 4, 64, generator=gen), torch.randn(1, 50, 2, 64, generator=gen)
    logits = gate(q, k)
    assert logits.shape == (1, 2, 50, 4)
    for t in range(50):
        fin = torch.isfinite(logits[0, 0, t]).nonzero().flatten().tolist()
        assert fin == list(range(t // 16))


def test_gate_weights_round_trip_bit_exact(tmp_path):
    gates = {1: AttnGate(8, 2, 64, 64, d_gate=128, rmsnorm=True),
             3: AttnGate(8, 2, 64, 64, d_gate=128, rmsnorm=True)}
    with torch.no_grad():
        for g in gates.values():
            g.q_norm.uniform_(0.5, 2.0)
    for name in ("g.safetensors", "g.pt"):
        save_gates(tmp_path / name, gates, {"spec": "x"})
        loaded, meta = load_gates(tmp_path / name)
        assert sorted(loaded) == [1, 3] and meta["spec"] == "x"
        for i, gate in gates.items():
            for (n, a), (m, b) in zip(gate.state_dict().items(),
                                      loaded[i].state_dict().items()):
                assert n == m and torch.equal(a, b)


def test_a_file_that_is_not_a_gate_file_is_named(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    torch.save({"a": 1}, tmp_path / "dict.pt")
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    save_gates(tmp_path / "other.pt", {})
    blob = torch.load(tmp_path / "other.pt", weights_only=True)
    blob["metadata"]["format"] = "something-else"
    torch.save(blob, tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="no such gate file"):
        load_gates(tmp_path / "missing.safetensors")
    for name in ("junk.safetensors", "junk.pt", "dict.pt", "tensor.pt", "other.pt"):
        with pytest.raises(ValueError, match="is not a sparsegen gate file"):
            load_gates(tmp_path / name)


# --- row ranges and the row-chunked loss -----------------------------------------------------

@pytest.mark.parametrize("S,r0,n", [(45, 0, None), (45, 20, 7), (45, 0, 3), (45, 44, 1),
                                    (45, 16, 16), (45, 31, 14)])
def test_reference_row_range_is_those_rows(S, r0, n):
    """A row range gives the whole-sequence target's rows, cut to the blocks they can reach."""
    gen = torch.Generator().manual_seed(S + r0)
    q, k = torch.randn(2, S, 6, 16, generator=gen) * 2, torch.randn(2, S, 2, 16, generator=gen)
    full = brute_force_target(q, k, 16, 0.3)
    got = distill_target_reference(q, k, 16, 0.3, chunk=5, compute_dtype=torch.float64,
                                   row_start=r0, num_rows=n)
    r1 = S if n is None else r0 + n
    assert got.shape == (2, 2, r1 - r0, -(-r1 // 16))
    torch.testing.assert_close(got.double(), full[:, :, r0:r1, :got.shape[-1]])
    assert torch.all(full[:, :, r0:r1, got.shape[-1]:] == 0)


@pytest.mark.parametrize("r0,n", [(-1, 4), (0, 0), (40, 6), (45, None), (3, -2)])
def test_bad_row_range_is_a_clear_error(r0, n):
    q, k = torch.randn(1, 45, 2, 64), torch.randn(1, 45, 1, 64)
    with pytest.raises(ValueError, match="do not lie in a sequence of 45 tokens"):
        distill_target_reference(q, k, 16, row_start=r0, num_rows=n)
    with pytest.raises(ValueError, match="do not lie in a sequence of 45 tokens"):
        TritonDistillTarget(DistillStatic(16, 64, 2, "fp32"))(q, k, row_start=r0, num_rows=n)


@needs_interp
@pytest.mark.parametrize("bs,G,D,S,r0,n,dtype", [
    (16, 1, 64, 77, 5, 40, torch.float32),      # rows not aligned to a block or a tile
    (16, 3, 64, 150, 100, 50, torch.float32),   # the last rows
    (32, 4, 64, 130, 0, 20, torch.float16),     # rows inside block 0 only: all zeros
    (16, 8, 64, 97, 96, 1, torch.float32),      # one row
    (64, 2, 128, 200, 64, 129, torch.float16),
    (16, 2, 64, 70, 17, 33, torch.float32)])
def test_kernel_row_range_matches_reference(bs, G, D, S, r0, n, dtype):
    gen = torch.Generator().manual_seed(S + r0)
    q = (torch.randn(2, S, 2 * G, D, generator=gen) * 1.5).to(dtype)
    k = torch.randn(2, S, 2, D, generator=gen).to(dtype)
    kern = TritonDistillTarget(DistillStatic(bs, D, G, "fp32" if dtype == torch.float32
                                             else "fp16"))
    got = kern(q, k, 0.1, row_start=r0, num_rows=n)
    want = distill_target_reference(q, k, bs, 0.1, compute_dtype=torch.float64, row_start=r0,
                                    num_rows=n)
    assert got.shape == want.shape == (2, 2, n, -(-(r0 + n) // bs))
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    torch.testing.assert_close(kern.reference(q, k, 0.1, row_start=r0, num_rows=n), want,
                               rtol=1e-5, atol=1e-6)


def _gate_inputs(B, S, Hkv, G, D, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, h, D, generator=gen) * sc
            for h, sc in ((Hkv * G, 1.0), (Hkv, 1.0), (Hkv * G, 1.5), (Hkv, 1.0))]


def _full_loss_and_grads(gate, qn, kn, qp, kp, scale):
    loss = gate_kl_loss(gate(qn, kn), distill_target_reference(qp, kp, gate.block_size, scale))
    return loss, torch.autograd.grad(loss, list(gate.parameters()))


@pytest.mark.parametrize("G,D,S,bs,gate_kw", [
    (1, 64, 100, 16, {}),                                       # S not a multiple of the block
    (2, 64, 128, 16, {"rmsnorm": True}),
    (3, 64, 90, 32, {"query_reduction": "mean"}),
    (4, 128, 75, 16, {"rope": False}),
    (8, 64, 70, 8, {"rmsnorm": True, "query_reduction": "mean"}),
    (2, 64, 12, 16, {}),                                        # shorter than one block
    (4, 64, 16, 16, {})])                                       # exactly one block
def test_chunked_loss_equals_whole_sequence_loss(G, D, S, bs, gate_kw):
    """Loss and every gate parameter's gradient, for chunks that divide S and that do not.
    AttnGate computes in fp32 (its query side casts to fp32), so fp32 with tight tolerances."""
    torch.manual_seed(G * 100 + S)
    gate = AttnGate(2 * G, 2, D, bs, d_gate=32, **gate_kw)
    with torch.no_grad():                       # non-trivial norms so their gradients count
        for name, prm in gate.named_parameters():
            if name.endswith("norm"):
                prm.uniform_(0.5, 1.5)
    qn, kn, qp, kp = _gate_inputs(2, S, 2, G, D, seed=S)
    want, want_grads = _full_loss_and_grads(gate, qn, kn, qp, kp, 0.2)
    for chunk in (1, 7, bs, 3 * bs + 5, S, 4 * S):
        got = gate_distill_loss(gate, qn, kn, qp, kp, 0.2, chunk_rows=chunk, impl="torch")
        grads = torch.autograd.grad(got, list(gate.parameters()), allow_unused=True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
        for (name, _), g, w in zip(gate.named_parameters(), grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7, msg=f"{name}, chunk {chunk}")
    if S <= bs:
        assert want.item() == 0.0                                   # no row has a block
    with torch.no_grad():                       # evaluation: the same value, no gradients
        torch.testing.assert_close(gate_distill_loss(gate, qn, kn, qp, kp, 0.2, chunk_rows=9,
                                                     impl="torch"), want.detach(),
                                   rtol=1e-5, atol=1e-7)


def test_chunked_loss_default_chunk_and_backward():
    """The default chunk; loss.backward() fills the same .grad as the whole-sequence loss."""
    gate = AttnGate(8, 2, 64, 16, d_gate=32)
    qn, kn, qp, kp = _gate_inputs(1, 200, 2, 4, 64, seed=3)
    _, want_grads = _full_loss_and_grads(gate, qn, kn, qp, kp, None)
    gate_distill_loss(gate, qn, kn, qp, kp, impl="torch").backward()
    for prm, w in zip(gate.parameters(), want_grads):
        torch.testing.assert_close(prm.grad, w, rtol=1e-4, atol=1e-7)


def test_default_chunk_rows():
    assert default_chunk_rows(1, 8, 4096, 64) == 4096             # short: one chunk
    for S in (32768, 65536, 131072):                              # long: a ~32 MB chunk
        c = default_chunk_rows(1, 8, S, 64)
        assert c % 64 == 0 and c < S
        assert 16 << 20 < c * 8 * (S // 64) * 4 <= distill.CHUNK_TARGET_BYTES
    assert default_chunk_rows(64, 32, 1 << 20, 16) == 64          # never below 64 rows


@needs_interp
def test_chunked_loss_through_the_kernel():
    gate = AttnGate(6, 2, 64, 16, d_gate=32, rmsnorm=True)
    qn, kn, qp, kp = _gate_inputs(2, 83, 2, 3, 64, seed=9)
    want, want_grads = _full_loss_and_grads(gate, qn, kn, qp, kp, 0.15)
    got = gate_distill_loss(gate, qn, kn, qp, kp, 0.15, chunk_rows=30, impl="triton")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, w in zip(torch.autograd.grad(got, list(gate.parameters())), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_chunked_loss_rejects_bad_input():
    gate = AttnGate(4, 2, 64, 16, d_gate=32)
    qn, kn, qp, kp = _gate_inputs(1, 40, 2, 2, 64, seed=1)
    with pytest.raises(ValueError, match="k_post has shape"):
        gate_distill_loss(gate, qn, kn, qp, kp[:, :30])
    with pytest.raises(ValueError, match="q_nope has shape"):
        gate_distill_loss(gate, qn[..., :32], kn, qp, kp)
    with pytest.raises(ValueError, match="must be \\[B, S, H, D\\]"):
        gate_distill_loss(gate, qn[0], kn, qp, kp)
    with pytest.raises(ValueError, match="chunk_rows=0"):
        gate_distill_loss(gate, qn, kn, qp, kp, chunk_rows=0)
    with pytest.raises(ValueError, match="impl 'cuda'"):
        gate_distill_loss(gate, qn, kn, qp, kp, impl="cuda")


class _LargestTensor:
    """Records the element count of the largest tensor any torch op returns (forward and
    backward both dispatch through it)."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        spy = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor):
                        spy.numel = max(spy.numel, t.numel())
                return out

        self.numel, self.mode = 0, Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_chunked_path_never_forms_a_sequence_by_blocks_tensor(monkeypatch):
    """The chunked loss asks for at most `chunk` target rows at a time, and no op of its
    forward or backward returns a tensor as large as the whole target [B, Hkv, S, NB]; the
    whole-sequence loss does (so the spy sees such tensors when they exist)."""
    B, S, Hkv, G, D, bs, chunk = 1, 2048, 1, 2, 16, 8, 32
    full_numel = B * Hkv * S * (S // bs)
    asked = []
    real = distill.distill_target

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        asked.append(tuple(out.shape))
        return out

    monkeypatch.setattr(distill, "distill_target", spy)
    gate = AttnGate(Hkv * G, Hkv, D, bs, d_gate=16)
    qn, kn, qp, kp = _gate_inputs(B, S, Hkv, G, D, seed=4)
    with _LargestTensor() as big:
        gate_distill_loss(gate, qn, kn, qp, kp, chunk_rows=chunk, impl="torch").backward()
    assert len(asked) == -(-(S - bs) // chunk) and all(a[2] <= chunk for a in asked)
    # the largest is the reference's probabilities of one chunk, [B, Hq, chunk, <= S]
    assert big.numel <= B * Hkv * G * chunk * S < full_numel // 2
    with _LargestTensor() as big_full:
        _full_loss_and_grads(gate, qn, kn, qp, kp, None)
    assert big_full.numel >= full_numel


# --- Hugging Face: sparsegen distill ----------------------------------------------------------

SPEC = """
name: tiny_gate
model: {{num_q_heads: 4, num_kv_heads: 2, head_dim: 64, num_layers: 2, dense_layers: [{dense}]}}
selection: {{rule: gate, block_size: 16, sink_blocks: 0, local_blocks: 1, budget_tokens: 48,
            gate: {{d_gate: 32}}}}
"""


def tiny_model(kind, path):
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"),
                          "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                          "qwen3": ("Qwen3Config", "Qwen3ForCausalLM")}[kind]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(
        vocab_size=256, hidden_size=128, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64,
        max_position_embeddings=256, initializer_range=0.2)
    model = getattr(transformers, model_cls)(cfg)
    model.save_pretrained(path)
    return model


def test_capture_sees_the_layers_pre_rope_q_and_k(tmp_path):
    from sparsegen.integrations.hf_distill import attention_layers, capture_rope

    model = tiny_model("qwen3", tmp_path / "m")
    ids = torch.randint(0, 256, (1, 40))
    seen = {}
    with capture_rope(attention_layers(model), lambda i, m, q, k, qp, kp: seen.setdefault(
            i, (q, k, qp, kp))), torch.no_grad():
        model.model(input_ids=ids)
    assert sorted(seen) == [0, 1]
    attn = model.model.layers[0].self_attn
    with torch.no_grad():
        h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
        q = attn.q_norm(attn.q_proj(h).view(1, 40, 4, 64)).transpose(1, 2)
        k = attn.k_norm(attn.k_proj(h).view(1, 40, 2, 64)).transpose(1, 2)
    torch.testing.assert_close(seen[0][0], q)
    torch.testing.assert_close(seen[0][1], k)
    assert not torch.allclose(seen[0][2], q)                          # rotated


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_distiller_loss_is_each_layers_whole_sequence_loss(tmp_path, chunk_rows):
    """GateDistiller's per-layer loss (row-chunked) equals the whole-sequence loss of the
    same gate on the q/k the model hands its RoPE, with the layer's own softmax scale."""
    from sparsegen.integrations.hf_distill import (
        GateDistiller,
        attention_layers,
        capture_rope,
    )

    model = tiny_model("qwen2", tmp_path / "m")
    ids = torch.randint(0, 256, (2, 50), generator=torch.Generator().manual_seed(1))
    seen = {}
    with capture_rope(attention_layers(model), lambda i, m, q, k, qp, kp: seen.setdefault(
            i, [t.transpose(1, 2) for t in (q, k, qp, kp)] + [m.scaling])), torch.no_grad():
        model.model(input_ids=ids)
    distiller = GateDistiller(model, parse_spec(SPEC.format(dense="")), chunk_rows=chunk_rows)
    loss, per_layer = distiller(ids)
    assert sorted(per_layer) == [0, 1]
    for i, (q, k, qp, kp, scale) in seen.items():
        want = gate_kl_loss(distiller.gates[str(i)](q, k),
                            distill_target_reference(qp, kp, 16, scale))
        torch.testing.assert_close(per_layer[i], want, rtol=1e-5, atol=1e-7)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in distiller.gates.parameters())


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_distill_trains_and_reloads(kind, tmp_path):
    from sparsegen.distill_cli import run_distill

    model_dir = tmp_path / "model"
    tiny_model(kind, model_dir)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(SPEC.format(dense=0))
    tokens = tmp_path / "tokens.pt"
    torch.save(torch.randint(0, 256, (2000,), generator=torch.Generator().manual_seed(0)), tokens)
    out = tmp_path / "gates.safetensors"
    result = run_distill(spec_path, str(model_dir), tokens, out, steps=12, lr=1e-2, batch=2,
                         seq_len=64, device="cpu", dtype="fp32", log=None)
    losses = result["losses"]
    assert result["layers"] == [1]                                    # layer 0 is dense
    assert sum(losses[-3:]) / 3 < 0.7 * losses[0], losses
    gates, meta = load_gates(out)
    assert meta["spec"] == "tiny_gate" and sorted(gates) == [1]
    # reload bit-exactly: the same bytes give the same logits
    again = tmp_path / "again.safetensors"
    save_gates(again, gates, {"spec": meta["spec"]})
    from safetensors.torch import load_file
    a, b = load_file(out), load_file(again)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_cli_subcommand(tmp_path, capsys):
    from sparsegen.distill_cli import register

    tiny_model("llama", tmp_path / "model")
    (tmp_path / "spec.yaml").write_text(SPEC.format(dense=""))
    (tmp_path / "data.txt").write_text("sparse attention decodes long reasoning traces. " * 20)
    parser = argparse.ArgumentParser(prog="sparsegen")
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["distill", str(tmp_path / "spec.yaml"), "--model",
                              str(tmp_path / "model"), "--data", str(tmp_path / "data.txt"),
                              "--tokenizer", "bytes", "--out", str(tmp_path / "g.pt"),
                              "--steps", "3", "--seq-len", "48", "--device", "cpu",
                              "--dtype", "fp32", "--log-every", "100"])
    assert args.func(args) == 0
    assert "saved gates of layers [0, 1]" in capsys.readouterr().out
    assert sorted(load_gates(tmp_path / "g.pt")[0]) == [0, 1]


def test_distill_rejects_a_mismatched_spec(tmp_path):
    from sparsegen.distill_cli import run_distill
    from sparsegen.errors import SparsegenError

    model = tiny_model("llama", tmp_path / "m")
    spec = parse_spec(SPEC.format(dense="").replace("num_kv_heads: 2", "num_kv_heads: 4"))
    torch.save(torch.randint(0, 256, (200,)), tmp_path / "t.pt")
    with pytest.raises(SparsegenError, match="does not match the model"):
        run_distill(spec, model, tmp_path / "t.pt", tmp_path / "g.pt", steps=1, seq_len=32,
                    device="cpu", log=None)


def test_token_streams_that_are_not_integer_ids_are_named(tmp_path):
    """A float array would be truncated to ids silently; a file that does not load, or holds
    no array, gets a named error; integer arrays of any width load as int64."""
    import numpy as np

    from sparsegen.distill_cli import load_tokens
    from sparsegen.errors import SparsegenError

    np.save(tmp_path / "f.npy", np.random.rand(50))
    torch.save(torch.rand(50), tmp_path / "f.pt")
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    torch.save({"ids": [1, 2]}, tmp_path / "d.pt")
    for name in ("f.npy", "f.pt"):
        with pytest.raises(SparsegenError, match="must be integers"):
            load_tokens(tmp_path / name)
    for name in ("junk.npy", "d.pt"):
        with pytest.raises(SparsegenError, match="does not load as an array of token ids"):
            load_tokens(tmp_path / name)
    np.save(tmp_path / "i.npy", np.arange(12, dtype=np.int16).reshape(3, 4))
    ids = load_tokens(tmp_path / "i.npy", vocab_size=16)
    assert ids.dtype == torch.int64 and ids.tolist() == list(range(12))


def test_kernel_config_and_compile():
    st = DistillStatic(64, 128, 4, "bf16")
    assert TritonDistillTarget.check_config(st, TritonDistillTarget.default_config(st)) is None
    for g in (1, 3, 8, 16):
        s = DistillStatic(16, 64, g, "fp16")
        assert TritonDistillTarget.check_config(s, TritonDistillTarget.default_config(s)) is None
    bad = {**TritonDistillTarget.default_config(st), "block_n": 128, "block_m": 16}
    assert "block_n" in TritonDistillTarget.check_config(st, bad)
    for static in (st, DistillStatic(16, 128, 8, "fp16")):
        facts = TritonDistillTarget(static).compile_sm90()
        for f in facts.values():
            assert f["cubin_bytes"] > 0 and f.get("local", 0) == 0


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)


def test_distill_target_is_tuned_on_its_own_buckets():
    """Training runs one sequence in row chunks: the tuner measures the target kernel at
    batch 1 and at most 16K tokens, the decode-side rule kernels on the attention's buckets."""
    from sparsegen.plan import make_plan, rule_kernel_plans
    from sparsegen.spec import load_spec

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    plan = make_plan(load_spec(os.path.join(root, "examples", "specs",
                                            "seer-attention-r.yaml")))
    shapes = {k.name: [(s.batch, s.seq_len) for s in k.shapes] for k in rule_kernel_plans(plan)}
    assert shapes["distill_target"] == [(1, 8192), (1, 16384)]
    attention = [(s.batch, s.seq_len) for s in plan.kernels[0].shapes]
    assert shapes["gate_score"] == shapes["block_select"] == attention


def test_distill_picks_the_tuned_target_config(tmp_path, monkeypatch):
    """On a GPU `sparsegen distill` runs distill_target at the config `sparsegen tune` stored
    for the spec and GPU (the committed H100 entries; nearest bucket, as an emitted module
    picks); nothing tuned (another GPU, an empty database), no GPU or no such kernel: None,
    the kernel's default."""
    import json
    from pathlib import Path

    from sparsegen import distill_cli
    from sparsegen.emit import tuned_rule_config
    from sparsegen.plan import make_plan
    from sparsegen.spec import load_spec
    from sparsegen.tune import db as tdb

    root = Path(__file__).resolve().parents[1]
    spec = load_spec(root / "examples" / "specs" / "seer-attention-r.yaml")
    plan, h100 = make_plan(spec), tdb.GpuId("NVIDIA H100 80GB HBM3", "9.0")
    db = tdb.TuningDB(root / "tuning_db")
    (path,) = (root / "tuning_db" / h100.slug).glob("distill_target-*.json")
    want = {e["shape"]["seq_len"]: e["best"]["config"]
            for e in json.loads(path.read_text())["entries"]}
    assert set(want) == {8192, 16384}
    assert tuned_rule_config(plan, "distill_target", h100, 1, 8192, db) == want[8192]
    assert tuned_rule_config(plan, "distill_target", h100, 2, 40000, db) == want[16384]
    assert tuned_rule_config(plan, "distill_target", tdb.GpuId("Fake", "9.0"), 1, 8192,
                             db) is None
    assert tuned_rule_config(plan, "distill_target", h100, 1, 8192,
                             tdb.TuningDB(tmp_path)) is None
    assert tuned_rule_config(plan, "no_such_kernel", h100, 1, 8192, db) is None

    logs = []
    assert distill_cli._tuned_target_config(spec, "cpu", 1, 8192, db.root, logs.append) is None
    monkeypatch.setattr(tdb, "torch_gpu", lambda device: h100)
    got = distill_cli._tuned_target_config(spec, "cuda", 1, 4096, db.root, logs.append)
    assert got == want[8192] and logs == [f"distillation target kernel: tuned config {got}"]


def test_distill_looks_up_the_target_config_for_its_gpu(tmp_path, monkeypatch):
    """run_distill on a (pretend) GPU asks the tuning database for its spec's distill_target
    config and says what it runs; a spec nobody tuned runs the default."""
    from sparsegen.distill_cli import run_distill
    from sparsegen.tune import db as tdb

    model = tiny_model("llama", tmp_path / "m")
    torch.save(torch.randint(0, 256, (200,)), tmp_path / "t.pt")
    monkeypatch.setattr(tdb, "torch_gpu",
                        lambda device: tdb.GpuId("NVIDIA H100 80GB HBM3", "9.0"))
    logs = []
    run_distill(parse_spec(SPEC.format(dense="")), model, tmp_path / "t.pt", tmp_path / "g.pt",
                steps=1, seq_len=32, device="cpu", log=logs.append, db=tmp_path / "db")
    assert logs[0] == ("distillation target kernel: default config (none tuned for "
                       f"nvidia-h100-80gb-hbm3-sm90 in {tmp_path / 'db'})")
