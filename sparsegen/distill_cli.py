"""`sparsegen distill SPEC --model M --data FILE --out gates.safetensors`: train the gate rule's
AttnGates of a Hugging Face causal LM by self-distillation (SeerAttention-R); only the gate
parameters train (AdamW, linear warm-up then cosine decay, as the paper's lr 1e-3 cosine).

Data: a text file (tokenised with the model's tokenizer, or `--tokenizer bytes` for UTF-8
bytes), or a token stream: .npy / .pt of integer ids, or .ids / .tokens text of whitespace-
separated ids. Training windows of --seq-len tokens are taken in order and wrap around.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

from .errors import SparsegenError

TOKEN_SUFFIXES = (".npy", ".pt", ".pth", ".ids", ".tokens")


def load_tokens(path, data_format: str = "auto", tokenizer: str | None = None,
                vocab_size: int | None = None):
    """1-D int64 tensor of token ids from a text file or a token stream."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise SparsegenError(f"{path}: no such data file")
    fmt = data_format
    if fmt == "auto":
        fmt = "tokens" if path.suffix in TOKEN_SUFFIXES else "text"
    if fmt == "tokens":
        if path.suffix in (".npy", ".pt", ".pth"):
            ids = _integer_ids(path)
        else:
            try:
                ids = torch.tensor([int(x) for x in path.read_text().split()], dtype=torch.long)
            except ValueError:
                raise SparsegenError(f"{path}: a token stream holds whitespace-separated "
                                     "integer ids") from None
    elif fmt == "text":
        text = path.read_text(encoding="utf-8", errors="replace")
        if tokenizer == "bytes":
            ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long)
        else:
            if tokenizer is None:
                raise SparsegenError("text data needs a tokenizer: --tokenizer PATH, or "
                                     "--tokenizer bytes for UTF-8 bytes as ids")
            from transformers import AutoTokenizer
            try:
                tok = AutoTokenizer.from_pretrained(tokenizer)
            except (OSError, ValueError) as e:
                raise SparsegenError(f"cannot load a tokenizer from {tokenizer}: "
                                     f"{str(e).splitlines()[0]}") from None
            ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    else:
        raise SparsegenError(f"data format {data_format!r} is not auto, text or tokens")
    if ids.numel() == 0:
        raise SparsegenError(f"{path}: holds no tokens")
    if vocab_size is not None and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        raise SparsegenError(f"{path}: token ids must lie in [0, {vocab_size}) for this model "
                             f"(found {int(ids.min())}..{int(ids.max())})")
    return ids


def _integer_ids(path: Path):
    """The ids of a .npy / .pt token stream, flattened to int64; a file that does not load
    as an array of integers is refused (a float array would be truncated silently)."""
    import numpy as np
    import torch

    try:
        raw = (torch.from_numpy(np.load(path, allow_pickle=False)) if path.suffix == ".npy"
               else torch.as_tensor(torch.load(path, weights_only=True)))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same answer
        raise SparsegenError(f"{path}: does not load as an array of token ids "
                             f"({type(e).__name__}); a token stream is a 1-D integer array "
                             "(.npy, or a tensor saved with torch.save)") from None
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise SparsegenError(f"{path}: token ids must be integers, this array is {raw.dtype}")
    return raw.long().reshape(-1)


def windows(ids, batch: int, seq_len: int, step: int):
    """The step-th batch of consecutive seq_len windows, wrapping around the stream."""
    import torch

    n = ids.numel()
    if n < seq_len:
        raise SparsegenError(f"the data holds {n} tokens; --seq-len {seq_len} needs at least "
                             "that many")
    starts = [((step * batch + i) * seq_len) % (n - seq_len + 1) for i in range(batch)]
    return torch.stack([ids[s:s + seq_len] for s in starts])


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, progress)))


def run_distill(spec_path, model, data, out, steps: int = 800, lr: float = 1e-3,
                batch: int = 1, seq_len: int = 4096, warmup: int | None = None,
                device: str | None = None, dtype: str = "auto", data_format: str = "auto",
                tokenizer: str | None = None, seed: int = 0, log_every: int = 10,
                log=print, db=None) -> dict:
    """Train the gates; returns {"losses": [...], "out": path, "layers": [...]}. `model` is a
    path / hub id or an already-loaded transformers model. On a GPU the distillation target
    kernel runs the config `sparsegen tune` found for this spec and GPU in the tuning
    database `db` (default: $SPARSEGEN_TUNING_DB or ./tuning_db), else its default."""
    import torch

    from .integrations.hf_distill import GateDistiller
    from .methods.gate import save_gates
    from .spec import load_spec

    spec = load_spec(spec_path) if not hasattr(spec_path, "selection") else spec_path
    # cheap checks first: a wrong spec or a missing data file must not wait for a model load
    if spec.selection.rule != "gate":
        raise SparsegenError(f"{spec.source}: selection.rule = {spec.selection.rule!r}: distill "
                             "trains the gate rule's AttnGates; use a spec with rule: gate")
    if not Path(data).is_file():
        raise SparsegenError(f"{data}: no such data file (a text file or a token stream)")
    torch.manual_seed(seed)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(model, (str, Path)):
        model = _load_model(model, device, dtype)
    model.requires_grad_(False)
    model.eval()
    tok_source = tokenizer
    if tok_source is None and data_format != "tokens" and Path(data).suffix not in TOKEN_SUFFIXES:
        tok_source = getattr(model, "name_or_path", None) or None
    ids = load_tokens(data, data_format, tok_source, model.config.vocab_size)
    target_config = _tuned_target_config(spec, device, batch, seq_len, db, log)
    distiller = GateDistiller(model, spec, target_config=target_config).to(device)
    params = list(distiller.gates.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20) if warmup is None else max(1, warmup)
    losses = []
    t0 = time.time()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup)
        loss, _ = distiller(windows(ids, batch, seq_len, step).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if log and (step % log_every == 0 or step == steps - 1):
            log(f"step {step:5d}  loss {losses[-1]:.5f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.time() - t0:.1f}s")
    save_gates(out, distiller.gate_dict(),
               {"spec": spec.name, "steps": steps, "final_loss": losses[-1] if losses else ""})
    return {"losses": losses, "out": str(out), "layers": sorted(distiller.gate_dict())}


def _tuned_target_config(spec, device, batch: int, seq_len: int, db, log) -> dict | None:
    """The distillation target kernel's tuned config for this GPU (None: its default)."""
    from .emit import tuned_rule_config
    from .plan import make_plan
    from .tune.db import TuningDB, torch_gpu

    gpu = torch_gpu(device)
    if gpu is None:
        return None
    tuning_db = TuningDB(db)
    config = tuned_rule_config(make_plan(spec), "distill_target", gpu, batch, seq_len,
                               tuning_db)
    if log:
        log(f"distillation target kernel: tuned config {config}" if config else
            f"distillation target kernel: default config (none tuned for {gpu.slug} in "
            f"{tuning_db.root})")
    return config


def _load_model(path, device, dtype):
    import torch
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SparsegenError("`sparsegen distill` needs transformers: "
                             "pip install 'sparsegen[test]' or pip install transformers") from None
    torch_dtype = {"auto": "auto", "bf16": torch.bfloat16, "fp16": torch.float16,
                   "fp32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    except (OSError, ValueError) as e:
        raise SparsegenError(f"cannot load a causal LM from {path}: "
                             f"{str(e).splitlines()[0]}") from None
    return model.to(device)


def cmd_distill(args) -> int:
    result = run_distill(args.spec, args.model, args.data, args.out, steps=args.steps,
                         lr=args.lr, batch=args.batch, seq_len=args.seq_len, warmup=args.warmup,
                         device=args.device, dtype=args.dtype, data_format=args.data_format,
                         tokenizer=args.tokenizer, seed=args.seed, log_every=args.log_every,
                         db=args.db)
    losses = result["losses"]
    print(f"saved gates of layers {result['layers']} to {result['out']} "
          f"(loss {losses[0]:.5f} -> {losses[-1]:.5f})")
    return 0


def register(subparsers) -> None:
    """Add the `distill` subcommand to sparsegen's argparse subparsers."""
    p = subparsers.add_parser(
        "distill", help="train a gate-rule spec's AttnGates on a Hugging Face causal LM "
                        "(self-distillation; only gate parameters train)")
    p.add_argument("spec", help="a spec with selection.rule: gate")
    p.add_argument("--model", required=True, help="transformers model path or hub id "
                   "(Llama / Qwen2 / Qwen3 layouts)")
    p.add_argument("--data", required=True, help="text file or token stream "
                   f"({', '.join(TOKEN_SUFFIXES)})")
    p.add_argument("--out", required=True, help="gate weights (.safetensors, or torch.save)")
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default steps/20)")
    p.add_argument("--device", default=None, help="default: cuda when available")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                   help="dtype of the frozen model (gates train in fp32)")
    p.add_argument("--data-format", default="auto", choices=["auto", "text", "tokens"])
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer path for text data (default: the model's), or `bytes`")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--db", default=None, help="tuning database whose distill_target config "
                   "runs on the GPU (default: $SPARSEGEN_TUNING_DB or ./tuning_db)")
    p.set_defaults(func=cmd_distill)
