"""Gate self-distillation: the target kernel against the plain-torch reference, the reference
against a direct reading of the definition, the KL loss, and `sparsegen distill` on tiny
random-weight Llama / Qwen2 / Qwen3 models (loss falls; saved gates reload bit-exactly)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.distill_kernels import DistillStatic, TritonDistillTarget  # noqa: E402
from sparsegen.methods.distill import distill_target_reference, gate_kl_loss  # noqa: E402
from sparsegen.methods.gate import AttnGate, load_gates, save_gates  # noqa: E402
from sparsegen.spec import parse_spec  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402


def brute_force_target(q, k, bs, scale):
    """The definition, one query row at a time, in fp64."""
    B, S, Hq, D = q.shape
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
        for i in gates:
            for (n, a), (m, b) in zip(gates[i].state_dict().items(),
                                      loaded[i].state_dict().items()):
                assert n == m and torch.equal(a, b)


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
