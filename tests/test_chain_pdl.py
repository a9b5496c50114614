"""Programmatic dependent launch between a decode step's kernels (templates/triton/_chain_pdl.j2):
every kernel a step-chain adapter launches waits on its predecessor before anything else and is
launched with launch_pdl, only where chain_pdl is on; the tuning database's template hash sees
an edit of the shared macro file."""
from __future__ import annotations

import ast
import hashlib

import pytest

from sparsegen.codegen import render
from sparsegen.codegen.distill_kernels import DistillStatic, TritonDistillTarget
from sparsegen.codegen.entmax_kernels import EntmaxStatic, EntmaxTauTriton
from sparsegen.codegen.gate_kernels import (GateScoreStatic, GateStepStatic, TritonGateScore,
                                            TritonGateStep)
from sparsegen.codegen.kv_append import AppendStatic, TritonKVAppend
from sparsegen.codegen.quest_kernels import QuestStatic, TritonQuestMeta, TritonQuestScore
from sparsegen.codegen.select_kernels import SelectStatic, TritonBlockSelect
from sparsegen.codegen.triton_kernel import TritonKernel, chain_pdl

CHAIN = [(TritonKVAppend, AppendStatic(128, 8, "bf16", "bf16")),
         (TritonGateStep, GateStepStatic(64, 128, 4, 128)),
         (TritonGateScore, GateScoreStatic(64, 128, "bf16")),
         (TritonBlockSelect, SelectStatic(16, "topk", 4)),      # threshold + select kernels
         (TritonQuestMeta, QuestStatic(64, 128, 4, "bf16")),
         (TritonQuestScore, QuestStatic(64, 128, 4, "bf16", "mean_pooled", "shared")),
         (EntmaxTauTriton, EntmaxStatic(64, 128, 4, "bf16"))]


def _first_statements(path, names):
    """{kernel: the names of the calls its first line of code makes (after the docstring)}."""
    tree = ast.parse(path.read_text())
    out = {}
    for fn in tree.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in names:
            body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(
                fn.body[0].value, ast.Constant) else fn.body
            line = body[0].lineno
            out[fn.name] = [s.value.func.id for s in body if s.lineno == line
                            and isinstance(s, ast.Expr) and isinstance(s.value, ast.Call)
                            and isinstance(s.value.func, ast.Name)]
    return out


@pytest.mark.parametrize("cls,static", CHAIN, ids=[c.__name__ for c, _ in CHAIN])
def test_step_chain_kernels_wait_first_and_launch_with_pdl(cls, static, tmp_path):
    with chain_pdl(True):
        kern = cls(static, build_dir=tmp_path)
    assert kern.chain_pdl
    names = [name for name, _, _, _ in kern.signatures()]
    first = _first_statements(kern.render(), names)
    assert sorted(first) == sorted(names)
    for name in names:
        assert first[name] == ["gdc_launch_dependents", "gdc_wait"], name
    assert all(kw.get("launch_pdl") is True for _, _, _, kw in kern.signatures())

    with chain_pdl(False):
        plain = cls(static, build_dir=tmp_path)
    assert not plain.chain_pdl
    assert "gdc_" not in plain.render().read_text()
    assert all("launch_pdl" not in kw for _, _, _, kw in plain.signatures())


def test_pdl_only_for_step_chain_kernels(tmp_path):
    with chain_pdl(True):
        kern = TritonDistillTarget(DistillStatic(64, 64, 4), build_dir=tmp_path)
    assert not kern.chain_pdl and "gdc_" not in kern.render().read_text()
    assert not TritonKernel.step_chain


def test_chain_pdl_off_under_the_interpreter(monkeypatch):
    from sparsegen.codegen import triton_kernel
    monkeypatch.setattr(triton_kernel, "interpreted", lambda: True)
    with chain_pdl(True):
        assert not triton_kernel.chain_pdl_enabled()
    monkeypatch.setattr(triton_kernel, "interpreted", lambda: False)
    monkeypatch.setenv("SPARSEGEN_PDL", "0")
    assert not triton_kernel.chain_pdl_enabled()


def test_shared_instances_differ_by_launch(tmp_path):
    st = AppendStatic(64, 2, "fp16", "fp16")
    with chain_pdl(True):
        a = TritonKVAppend.shared(st)
    with chain_pdl(False):
        b = TritonKVAppend.shared(st)
    assert a is not b and a.chain_pdl and not b.chain_pdl


def test_template_hash_covers_the_shared_macros(monkeypatch):
    before = render.template_hash("triton/block_select.py.j2")
    plain = render.template_hash("triton/sparse_decode.py.j2")  # imports nothing
    assert plain == hashlib.sha256(
        render.template_source("triton/sparse_decode.py.j2").encode()).hexdigest()[:16]
    original = render.template_source

    def edited(name):
        text = original(name)
        return text + "{# edited #}\n" if name == "triton/_chain_pdl.j2" else text
    monkeypatch.setattr(render, "template_source", edited)
    assert render.template_hash("triton/block_select.py.j2") != before
    assert render.template_hash("triton/sparse_decode.py.j2") == plain


def test_chain_kernel_compiles_with_griddepcontrol():
    with chain_pdl(True):
        kern = TritonKVAppend(AppendStatic(64, 2, "bf16", "bf16"))
    ptx = kern.compile_sm90(keep_asm=True)["kv_append"]["_asm"]["ptx"]
    assert "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
