"""The spec language: examples load, bad specs give one clear message, fuzzing never
produces a traceback."""
from __future__ import annotations

import copy
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsegen.cli import main as cli_main
from sparsegen.errors import SpecError
from sparsegen.plan import make_plan
from sparsegen.spec import RULES, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples" / "specs").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "bad_specs").glob("*.yaml"))


def expected_fragment(path: Path) -> str:
    text = path.read_text()
    if not text:
        return "is empty"
    first = text.splitlines()[0]
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first[len("# expect: "):]


def test_every_rule_has_an_example():
    rules = {load_spec(p).selection.rule for p in EXAMPLES}
    assert rules == set(RULES)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_specs_load_and_plan(path):
    spec = load_spec(path)
    plan = make_plan(spec)
    assert plan.kernels and plan.kernels[0].static.block_size == spec.selection.block_size
    # normalization is stable: the normalized form parses back to the same spec
    again = parse_spec(yaml.safe_dump(spec.to_dict()), "roundtrip")
    assert again == spec


def test_corpus_is_large_enough():
    assert len(BAD) >= 30


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.name)
def test_bad_spec_gives_one_clear_error(path, capsys):
    want = expected_fragment(path)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert str(path) in msg, msg  # names the file
    assert want in msg, f"expected {want!r} in {msg!r}"
    assert "\n" not in msg
    # through the CLI: exit 2, one line on stderr, no traceback
    assert cli_main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and want in err


def test_missing_file_and_directory(tmp_path, capsys):
    assert cli_main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli_main(["check", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_binary_file(tmp_path, capsys):
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"\xff\xfe\x00\x01garbage")
    assert cli_main(["check", str(p)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_error_message_names_value_and_allowed():
    with pytest.raises(SpecError) as info:
        parse_spec("name: a\nmodel: {num_q_heads: 32, num_kv_heads: 8, head_dim: 128}\n"
                   "selection: {rule: topk, block_size: 48, budget_tokens: 1024}\n", "x.yaml")
    msg = str(info.value)
    assert msg.startswith("x.yaml: selection.block_size = 48: ")
    assert "power of two" in msg and "16" in msg and "128" in msg


def test_unknown_key_suggests_the_near_one():
    with pytest.raises(SpecError, match="did you mean `budget_tokens`"):
        parse_spec("name: a\nmodel: {num_q_heads: 8, num_kv_heads: 8, head_dim: 64}\n"
                   "selection: {rule: topk, budget_token: 1024}\n")


def test_check_prints_normalized_spec_and_plan(capsys):
    assert cli_main(["check", str(EXAMPLES[0])]) == 0
    out = capsys.readouterr().out
    doc = yaml.safe_load(out)
    assert doc["spec"]["selection"]["block_size"] > 0
    kernel = doc["plan"]["kernels"][0]
    assert kernel["kernel"] == "sparse_decode"
    for backend, info in kernel["backends"].items():
        assert info["tunables"] and info["default"]


def test_console_script_runs_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [\n")
    proc = subprocess.run([sys.executable, "-m", "sparsegen.cli", "check", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not valid YAML" in proc.stderr


# --- fuzzing ---------------------------------------------------------------------------
_NASTY = [None, 0, -1, 1, 3, 7, 48, 63, 64, 65, 10**12, -10**9, 0.5, 1.5, -0.0, float("inf"),
          float("nan"), True, False, "", "64", "bf16", "paged", "gate", "x" * 300, [], [1],
          ["max"], {}, {"a": 1}, [[1]], "\x00", "ünïcode"]


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for k, v in node.items():
            yield prefix + (k,)
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield prefix + (i,)
            yield from _paths(v, prefix + (i,))


def _set(doc, path, value):
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _mutate(rng, doc):
    doc = copy.deepcopy(doc)
    paths = list(_paths(doc))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(paths)
        action = rng.random()
        try:
            if action < 0.7:
                _set(doc, path, rng.choice(_NASTY))
            elif action < 0.85:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                del parent[path[-1]]
            else:
                parent = doc
                for key in path[:-1]:
                    parent = parent[key]
                if isinstance(parent, dict):
                    parent[f"{path[-1]}_typo"] = rng.choice(_NASTY)
        except (KeyError, IndexError, TypeError):
            pass
        paths = list(_paths(doc)) or [("name",)]
    return doc


def test_fuzz_mutated_examples_never_traceback():
    rng = random.Random(1234)
    docs = [yaml.safe_load(p.read_text()) for p in EXAMPLES]
    accepted = rejected = 0
    for i in range(1500):
        doc = _mutate(rng, rng.choice(docs))
        try:
            text = yaml.safe_dump(doc, allow_unicode=True)
        except yaml.YAMLError:
            continue
        try:
            spec = parse_spec(text, f"fuzz{i}.yaml")
        except SpecError as e:
            msg = str(e)
            assert msg.startswith(f"fuzz{i}.yaml") and "\n" not in msg
            rejected += 1
            continue
        make_plan(spec)  # whatever validates must also plan
        accepted += 1
    assert rejected > 500 and accepted > 20


def test_fuzz_raw_text_never_traceback():
    rng = random.Random(99)
    texts = [p.read_text() for p in EXAMPLES]
    for i in range(400):
        t = list(rng.choice(texts))
        for _ in range(rng.randint(1, 6)):
            pos = rng.randrange(len(t))
            t[pos] = rng.choice([":", "-", " ", "\n", "{", "[", "'", "\t", "#", "0", "x"])
        try:
            parse_spec("".join(t), "raw.yaml")
        except SpecError as e:
            assert "\n" not in str(e)


def test_unwritable_output_is_one_line_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["build", str(EXAMPLES[0]), "-o", str(blocker / "sub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(blocker) in err
