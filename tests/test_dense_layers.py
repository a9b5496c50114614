"""dense_layers for every rule: a listed layer keeps no rule state and attends every token,
checked against an independent fp64 dense attention over the tokens fed in."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from sparsegen.methods.decode_step import (DenseDecoder, GateDecoder, TopkDecoder,
                                           reference_attend)
from sparsegen.methods.decoders import make_cache, make_decoder
from sparsegen.spec import load_spec

SPECS = Path(__file__).resolve().parents[1] / "examples" / "specs"


def _spec_with_dense(tmp_path, name, layers):
    data = yaml.safe_load((SPECS / name).read_text())
    data["model"]["dense_layers"] = layers
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def _dense_fp64(q, ks, vs):
    """q [Hq, D]; ks, vs [n, Hkv, D] -> [Hq, D], plain softmax attention in fp64."""
    Hq, D = q.shape
    G = Hq // ks.shape[1]
    k = ks.double().repeat_interleave(G, 1)   # [n, Hq, D]
    v = vs.double().repeat_interleave(G, 1)
    p = torch.softmax(torch.einsum("hd,nhd->hn", q.double(), k) / math.sqrt(D), -1)
    return torch.einsum("hn,nhd->hd", p, v)


@pytest.mark.parametrize("name", ["dash-entmax.yaml", "raas-milestone.yaml",
                                  "quest-topk.yaml", "seer-attention-r.yaml"])
def test_dense_layer_attends_every_token(tmp_path, name):
    spec = _spec_with_dense(tmp_path, name, [0, 2])
    m = spec.model
    batch, capacity = 2, 400
    cache = make_cache(spec, batch, capacity, dtype=torch.float32)
    dec = make_decoder(spec, cache, layer=2, impl="torch")
    assert isinstance(dec, (DenseDecoder, GateDecoder, TopkDecoder)) and dec.dense
    g = torch.Generator().manual_seed(3)
    lengths = [150, 37]  # mixed, not multiples of the block
    k = torch.randn(batch, 150, m.num_kv_heads, m.head_dim, generator=g)
    v = torch.randn(batch, 150, m.num_kv_heads, m.head_dim, generator=g)
    extra = {"k_nope": k} if spec.selection.rule == "gate" else {}
    dec.prefill(cache, k, v, lengths=lengths, **extra)
    ks = [k[b, :n] for b, n in enumerate(lengths)]
    vs = [v[b, :n] for b, n in enumerate(lengths)]
    for _ in range(30):
        q = torch.randn(batch, m.num_q_heads, m.head_dim, generator=g)
        kn = torch.randn(batch, m.num_kv_heads, m.head_dim, generator=g)
        vn = torch.randn(batch, m.num_kv_heads, m.head_dim, generator=g)
        extra = {"q_nope": q, "k_nope": kn} if spec.selection.rule == "gate" else {}
        out = dec.step(q, kn, vn, cache, reference_attend(spec.selection.block_size), **extra)
        for b in range(batch):
            ks[b] = torch.cat([ks[b], kn[b:b + 1]])
            vs[b] = torch.cat([vs[b], vn[b:b + 1]])
            want = _dense_fp64(q[b], ks[b], vs[b])
            torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)
    assert cache.lengths == [n + 30 for n in lengths]


def test_only_listed_layers_are_dense(tmp_path):
    for name in ("dash-entmax.yaml", "raas-milestone.yaml"):
        spec = _spec_with_dense(tmp_path, name, [0])
        cache = make_cache(spec, 1, 256, dtype=torch.float32)
        assert isinstance(make_decoder(spec, cache, layer=0), DenseDecoder)
        assert not isinstance(make_decoder(spec, cache, layer=1), DenseDecoder)


@pytest.mark.parametrize("layer", [-1, 32, 1.0, True, "2"])
def test_a_layer_index_outside_the_model_is_refused(layer):
    """A layer index the spec's model does not have (32 layers here) would silently decode
    as some sparse layer; it is refused with the valid range named."""
    spec = load_spec(SPECS / "quest-topk.yaml")
    assert spec.model.num_layers == 32
    cache = make_cache(spec, 1, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"from 0 to 31 \(the spec's model.num_layers is 32\)"):
        make_decoder(spec, cache, layer=layer)
    make_decoder(spec, cache, layer=31)
