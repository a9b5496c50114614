"""The entmax rule's one-launch decode append (templates/triton/summary_append.py.j2): under
TRITON_INTERPRET=1 against the torch path (KVCache.append + EntmaxDecoder._after_append on
the host's lengths), through long decodes whose sequences fill blocks at different steps;
the step's refusal inside a CUDA graph capture without the generated kernels; sm_90
compilation. The graph replays themselves run on a GPU (tests/test_entmax_graph_gpu.py).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from sparsegen.codegen.kv_append import AppendStatic  # noqa: E402
from sparsegen.codegen.summary_append import (SummaryAppendStatic,  # noqa: E402
                                              TritonSummaryAppend)
from sparsegen.methods.entmax import EntmaxDecoder, EntmaxPool, EntmaxRule  # noqa: E402
from sparsegen.methods.kv_cache import KVCache  # noqa: E402
from tests.interp import needs_interp, only_if_not_interpreted, rerun_in_interpreter  # noqa: E402,I001
from tests.summary_cases import CASES, case_id, check_summary_append  # noqa: E402


@needs_interp
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_summary_append_matches_torch_path(case):
    check_summary_append(case)


@needs_interp
def test_decoder_step_uses_the_summary_append_and_matches_torch():
    """EntmaxDecoder.step with append_impl triton (the path a CUDA step takes) gives the torch
    decoder's selections and outputs over steps that fill blocks in both sequences."""
    B, Hkv, G, D, bs = 2, 2, 2, 32, 16
    rule = EntmaxRule(block_size=bs, sink_blocks=1, local_blocks=1, scale=4.0)
    g = torch.Generator().manual_seed(3)
    w = 0.3 * torch.randn(Hkv, D, generator=g)
    pk = torch.randn(B, 90, Hkv, D, generator=g)
    decs = []
    for impl in ("triton", "torch"):
        cache = KVCache(B, Hkv, D, 160, dtype=torch.float32)
        dec = EntmaxDecoder(rule, Hkv * G, Hkv, D, pool=EntmaxPool(Hkv, D, w), append_impl=impl)
        dec.prefill(cache, pk, pk, lengths=[90, 77])
        decs.append((dec, cache))
    for _ in range(40):
        q = torch.randn(B, Hkv * G, D, generator=g)
        kv = torch.randn(2, B, Hkv, D, generator=g)
        outs = [dec.step(q, kv[0], kv[1], cache) for dec, cache in decs]
        (a, _), (b, _) = decs
        assert torch.equal(a.last_selection.counts, b.last_selection.counts)
        assert torch.equal(a.last_selection.indices, b.last_selection.indices)
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    assert decs[0][0]._appenders, "the triton path ran"


def test_static_and_call_checks():
    a = AppendStatic(64, 2, "bf16", "bf16")
    with pytest.raises(ValueError, match="meta"):
        SummaryAppendStatic(AppendStatic(64, 2, meta="upper_bound", block_size=16), 16)
    with pytest.raises(ValueError, match="block_size"):
        SummaryAppendStatic(a, 0)
    st = SummaryAppendStatic(a, 128)
    assert st.chunk == 64 and SummaryAppendStatic(AppendStatic(256, 2), 128).chunk == 16
    with pytest.raises(ValueError, match="append_impl"):
        EntmaxDecoder(EntmaxRule(block_size=16), 2, 2, 64, append_impl="cuda")


def test_step_refuses_capture_without_the_generated_kernels(monkeypatch):
    """Inside a capture, a step on the torch path (host-decided summaries, host lengths)
    would replay wrong: it raises before changing anything."""
    import sparsegen.methods.entmax as entmax_mod

    B, Hkv, D, bs = 2, 2, 16, 16
    cache = KVCache(B, Hkv, D, 64, dtype=torch.float32)
    dec = EntmaxDecoder(EntmaxRule(block_size=bs), Hkv, Hkv, D, append_impl="torch")
    monkeypatch.setattr(entmax_mod, "capturing", lambda t: True)
    with pytest.raises(RuntimeError, match="CUDA graph"):
        dec.step(torch.randn(B, Hkv, D), torch.randn(B, Hkv, D), torch.randn(B, Hkv, D), cache)
    assert cache.lengths == [0, 0] and not cache.seq_lens.any()


def test_summary_append_compiles_for_sm90():
    for static in (SummaryAppendStatic(AppendStatic(128, 8, "bf16", "bf16"), 64),
                   SummaryAppendStatic(AppendStatic(64, 3, "fp16", "fp32", "paged", 32), 16),
                   SummaryAppendStatic(AppendStatic(128, 8, "bf16", "bf16", "paged", 128),
                                       128)):
        facts = TritonSummaryAppend(static).compile_sm90()["summary_append"]
        assert facts["cubin_bytes"] > 0 and facts.get("local", 0) == 0, facts


@only_if_not_interpreted
def test_interpreter_tests_in_subprocess():
    rerun_in_interpreter(__file__)
