"""Time one training step of every paper config on one GPU and estimate the time per epoch.

    python benchmarks/train_step.py                       # every configs/<paper>.yaml on the GPU
    python benchmarks/train_step.py cifar10 enwik8 --batch cifar10=8 --steps 5
    python benchmarks/train_step.py --smoke               # tiny versions on the CPU: checks the script runs

For each config the LightningModule named by its YAML (``model.class_path``/``init_args``, read with PyYAML) is
built on the device with the config's recompute setting and attention backend (``auto`` = Triton on CUDA); one
step is exactly what the Trainer runs under the config: ``training_step`` (loss over random bytes) under bf16
autocast, backward, gradient-norm clipping at the config's ``gradient_clip_val``, a fused AdamW step. After
``--warmup`` untimed steps (Triton compilation) the median of ``--steps`` timed steps is reported with the peak
memory, and ``fwd ms``: one no-grad forward at batch 1, the cost of each sampled byte.

Time per epoch on one GPU = step time × steps per epoch, steps per epoch = training sequences / per-GPU batch:
CIFAR-10 50,000 − val_size images; Enwik8 (100M − val_bytes − test_bytes) // seq_len random crops;
ImageNet 64×64 1,281,149 − val_size images (the Oord release); audio ``--audio-hours`` hours of training audio
at the config's sample rate // seq_len crops (an assumption: the paper's data set is not public).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import yaml

from lightning_sparse.atomic import atomic_write

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_CONFIGS = ("cifar10", "enwik8", "imagenet64", "audio_65k", "audio_262k", "audio_1m")
IMAGENET64_TRAIN = 1_281_149  # images in the van den Oord et al. train_64x64 release
ENWIK8_BYTES = 100_000_000


def instantiate(value: Any) -> Any:
    """Build ``{class_path, init_args}`` mappings (recursively) into objects; other values pass through."""
    if isinstance(value, dict) and "class_path" in value:
        module, _, name = value["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (value.get("init_args") or {}).items()})
    if isinstance(value, list):
        return [instantiate(v) for v in value]
    return value


def data_args(config: dict) -> dict:
    """The data module's init_args, with the module's defaults filled in for what the YAML leaves out."""
    import inspect

    module, _, name = config["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    args.update(config["data"].get("init_args") or {})
    return args


def training_sequences(config: dict, audio_hours: float) -> int:
    """Training sequences in one epoch of the config's data module (see the module docstring)."""
    data, kind = data_args(config), config["data"]["class_path"].rpartition(".")[2]
    if kind == "CIFAR10DataModule":
        return 50_000 - data["val_size"]
    if kind == "Enwik8DataModule":
        return data.get("train_samples") or (ENWIK8_BYTES - data["val_bytes"] - data["test_bytes"]) // data["seq_len"]
    if kind == "ImageNet64DataModule":
        return IMAGENET64_TRAIN - data["val_size"]
    if kind == "AudioDataModule":
        return int(audio_hours * 3600 * data["sample_rate"]) // data["seq_len"]
    raise ValueError(f"no epoch size known for data module {kind}; add it to training_sequences()")


def build_module(config: dict, smoke: bool) -> torch.nn.Module:
    """The config's LightningModule; ``smoke`` shrinks it (2 layers, head width 32, context ≤ 16,384) for the CPU."""
    model_args = dict(config["model"].get("init_args") or {})
    model_args["seq_len"] = data_args(config)["seq_len"]  # the CLI links data.seq_len to the model
    if smoke:
        heads = min(model_args.get("n_head", 4), 4)
        model_args.update(n_layer=2, n_head=heads, d_model=32 * heads, attention_backend="torch")
        pattern = model_args.get("pattern") or {}
        if model_args["seq_len"] > 16_384 and pattern.get("class_path", "").endswith(".Strided"):
            model_args["seq_len"] = 16_384
            model_args["pattern"] = {"class_path": pattern["class_path"], "init_args": {"stride": 128}}
    return instantiate({"class_path": config["model"]["class_path"], "init_args": model_args})


def random_batch(module: Any, batch: int, device: torch.device) -> torch.Tensor:
    """Random bytes in the module's batch form: records of seq_len with a start token, else seq_len + 1 windows."""
    length = module.config.seq_len + (0 if module.config.start_token else 1)
    return torch.randint(0, 256, (batch, length), dtype=torch.uint8, device=device)


def optimizer_for(module: torch.nn.Module, fused: bool) -> torch.optim.Optimizer:
    """AdamW with the module's groups (decay on ≥2-D tensors only), fused on CUDA."""
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": module.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=module.lr, betas=module.betas, fused=fused)


def measure(name: str, config: dict, batch: int, steps: int, warmup: int, device: torch.device, smoke: bool,
            audio_hours: float) -> dict:
    """Build, warm up and time one config; returns a row of the table."""
    cuda = device.type == "cuda"
    precision = str(config.get("trainer", {}).get("precision", "32-true"))
    # bf16-mixed = bf16 autocast as Lightning runs it; the CPU smoke run stays in float32 (bf16 is slow there)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16") and cuda)
    clip = config.get("trainer", {}).get("gradient_clip_val")
    module = build_module(config, smoke)
    with torch.device(device):
        module.configure_model()
    module.train()
    optimizer = optimizer_for(module, fused=cuda)
    params = module.model.num_parameters()
    data = random_batch(module, batch, device)

    def step() -> None:
        with autocast:
            loss = module.training_step(data, 0)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None  # no allocator statistics on the CPU
    module.eval()
    with torch.no_grad(), autocast:
        one = random_batch(module, 1, device)[:, : module.config.seq_len]
        module(one.long())  # warm the no-grad path (its own compilation)
        sync()
        start = time.perf_counter()
        module(one.long())
        sync()
        forward = time.perf_counter() - start
    step_s = statistics.median(times)
    sequences = training_sequences(config, audio_hours)
    steps_per_epoch = math.ceil(sequences / batch)
    return {
        "config": name + (" (smoke)" if smoke else ""),
        "params": params,
        "batch": batch,
        "seq_len": module.config.seq_len,
        "step_ms": step_s * 1e3,
        "tokens_per_s": batch * module.config.seq_len / step_s,
        "peak_gib": peak,
        "fwd_ms": forward * 1e3,
        "steps_per_epoch": steps_per_epoch,
        "epoch_h": step_s * steps_per_epoch / 3600,
    }


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| config | params | batch/GPU | step ms | tokens/s | peak GiB | fwd ms (b=1) | steps/epoch | h/epoch (1 GPU) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | | {r['batch']} | {r['error']} | | | | | |")
            continue
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(
            f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {peak} | {r['fwd_ms']:.1f} | {r['steps_per_epoch']:,} | "
            f"{r['epoch_h']:.2f} |"
        )
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_write(path) as f:
        f.write(json.dumps(payload, indent=2).encode())


def parse_batches(items: list[str]) -> dict[str, int]:
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if not value.isdigit() or int(value) <= 0:
            raise SystemExit(f"--batch takes NAME=N with a positive N, e.g. cifar10=8; got {item!r}")
        out[name] = int(value)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=list(PAPER_CONFIGS), help="config names under configs/")
    parser.add_argument("--batch", nargs="*", default=[], metavar="NAME=N",
                        help="per-GPU batch overrides (default: the config's data.batch_size)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compilation)")
    parser.add_argument("--audio-hours", type=float, default=100.0,
                        help="hours of training audio assumed for the audio epochs (default 100)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, batch 1, one timed step")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    batches = parse_batches(args.batch)
    if args.smoke:
        device, args.steps, args.warmup = torch.device("cpu"), 1, 1
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA GPU: run on the GPU machine, or use --smoke to check the script on the CPU")
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer is attached
    rows = []
    for name in args.configs:
        path = CONFIGS / f"{name}.yaml"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist; choose from {', '.join(PAPER_CONFIGS)}")
        config = yaml.safe_load(path.read_text())
        batch = 1 if args.smoke else batches.get(name, data_args(config)["batch_size"])
        try:
            rows.append(measure(name, config, batch, args.steps, args.warmup, device, args.smoke, args.audio_hours))
        except torch.OutOfMemoryError:
            rows.append({"config": name, "batch": batch, "error": "out of memory"})
        torch.cuda.empty_cache() if device.type == "cuda" else None
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)  # progress, one row at a time
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny models)"
    print(f"\nTraining step per config on {where}, torch {torch.__version__}; "
          f"audio epochs assume {args.audio_hours:g} h of training audio.\n")
    print(table(rows))
    if args.json:
        write_json(args.json, {"device": where, "torch": torch.__version__, "audio_hours": args.audio_hours,
                               "rows": rows})
    return rows


if __name__ == "__main__":
    main()
