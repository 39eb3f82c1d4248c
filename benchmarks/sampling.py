"""Sampling speed of the paper configs on one GPU: the KV-cached sampler against the uncached reference.

    python benchmarks/sampling.py                      # every target of issue 10, bf16, random-init paper models
    python benchmarks/sampling.py --jobs cifar10 enwik8_1 --json benchmarks/results/sampling.json
    python benchmarks/sampling.py --quick              # GPU smoke run: the same models, few positions per job
    python benchmarks/sampling.py --smoke              # tiny models on the CPU: checks the script runs

Each job builds the ``SparseTransformer`` of a config (``model.init_args`` of ``configs/<name>.yaml`` read with
PyYAML, patterns through a small ``class_path`` resolver, ``seq_len`` from ``data.init_args``; images get their
(H, W, C) position tables and the start token, as ``ImageDensityModel`` builds them) with random weights on the GPU
and samples under bf16 autocast (the Trainer's ``bf16-mixed``), ``attention_backend`` as configured (``auto`` =
Triton). One untimed short call first compiles the kernels. Then:

* **cached**: one ``sample()`` call of the job, timed end to end (prefill of the prompt with the training kernels,
  CUDA-graph capture, every decoding step); ``decode ms/pos`` = time after the first sampled position / the
  remaining positions.
* **uncached**: ``sample(cache=False)`` recomputes a full ``seq_len`` forward pass per position, so only
  ``--uncached-positions`` positions are timed (after one warm-up position) and the whole job is *extrapolated*
  from their mean.

Jobs (the targets of issue 10): CIFAR-10 16 images (batch 16 × 3,072 positions from the start token); ImageNet
64×64 4 images (batch 4 × 12,288); Enwik8 one stream and a batch of 16 (the last ``--enwik8-positions`` positions
of the 12,288 context after a random prompt; bytes/s summed over the batch); audio 65,536 one second (12,000
samples after a 12,000-sample random prompt). The model weights are random, so the timing is what is measured,
not sample quality.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from profiling import top_kernels  # benchmarks/profiling.py

from lightning_sparse.atomic import atomic_write
from lightning_sparse.model import START, SparseTransformer, SparseTransformerConfig
from lightning_sparse.sampling import sample
from lightning_sparse.yaml_objects import instantiate

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# name: (config, batch, prompt length (None = the start token), positions to generate, target kind, target value)
JOBS = {
    "cifar10": ("cifar10", 16, None, 3072, "total_s", 20.0),
    "imagenet64": ("imagenet64", 4, None, 12288, "total_s", 45.0),
    "enwik8_1": ("enwik8", 1, "tail", None, "bytes_per_s", 500.0),
    "enwik8_16": ("enwik8", 16, "tail", None, "bytes_per_s", 4000.0),
    "audio_65k": ("audio_65k", 1, 12000, 12000, "total_s", 40.0),
}
NETWORK_FIELDS = ("n_layer", "n_head", "d_model", "ff_mult", "qk_ratio", "dropout", "attention_backend")


def network_config(name: str, smoke: bool) -> SparseTransformerConfig:
    """The network of ``configs/<name>.yaml`` as its LightningModule would build it (without importing Lightning
    modules, so no jsonargparse is needed); ``smoke`` shrinks it to 2 layers of width 64 and a short context."""
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    args = config["model"].get("init_args") or {}
    kw = {k: args[k] for k in NETWORK_FIELDS if k in args}
    kw["seq_len"] = config["data"]["init_args"]["seq_len"]
    kw["pattern"] = instantiate(args["pattern"])
    if config["model"]["class_path"].endswith("ImageDensityModel"):
        kw.update(position_shape=tuple(args.get("image_shape", (32, 32, 3))), start_token=True)
    if smoke:
        kw.update(n_layer=2, d_model=64, n_head=min(kw.get("n_head", 4), 4), attention_backend="torch")
        if kw["seq_len"] > 4096 and "position_shape" in kw:  # a 32×32×3 image instead
            kw.update(seq_len=3072, position_shape=(32, 32, 3))
        elif kw["seq_len"] > 4096:  # keep the pattern, shorten the context to a multiple of its stride
            stride = getattr(kw["pattern"], "stride", 128)
            kw["seq_len"] = stride * max(2, 4096 // stride)
    return SparseTransformerConfig(**kw)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prompt_for(batch: int, prompt: int | None, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """The start token (``prompt`` None) or ``prompt`` random bytes, for each of ``batch`` sequences."""
    if prompt is None:
        return torch.full((batch, 1), START, dtype=torch.long, device=device)
    return torch.randint(0, 256, (batch, prompt), generator=generator, device=device)


def timed_cached(model, prompt, length, device) -> dict:
    """One cached ``sample()`` call: total seconds, seconds to the first sampled position, decode ms/position."""
    marks: list[float] = []

    def progress(_: int) -> None:
        if not marks:  # the first call comes right after the prefill and the first draw
            sync(device)
            marks.append(time.perf_counter())

    generator = torch.Generator(device=device).manual_seed(0)
    sync(device)
    start = time.perf_counter()
    sample(model, prompt, length, generator=generator, progress=progress)
    sync(device)
    end = time.perf_counter()
    decode = (end - marks[0]) / max(1, length - 1)
    return {"total_s": end - start, "prefill_s": marks[0] - start, "decode_ms": decode * 1e3}


def timed_uncached(model, prompt, positions, device) -> float:
    """Seconds per position of the uncached reference, the mean over ``positions`` after one warm-up position."""
    generator = torch.Generator(device=device).manual_seed(0)
    sample(model, prompt, 1, generator=generator, cache=False)
    sync(device)
    start = time.perf_counter()
    sample(model, prompt, positions, generator=generator, cache=False)
    sync(device)
    return (time.perf_counter() - start) / positions


def run_job(job: str, args: argparse.Namespace, device: torch.device) -> dict:
    name, batch, prompt_len, length, target_kind, target = JOBS[job]
    config = network_config(name, args.smoke)
    torch.manual_seed(0)
    with torch.device(device):
        model = SparseTransformer(config).eval()
    if prompt_len == "tail":  # Enwik8: the last positions of the context
        length = min(args.enwik8_positions, config.seq_len - 1)
        prompt_len = config.seq_len - length
    if args.quick or args.smoke:
        length = min(length, args.quick_positions)
    if prompt_len is not None:
        prompt_len = min(prompt_len, config.seq_len - length)
    generator = torch.Generator(device=device).manual_seed(1)
    prompt = prompt_for(batch, prompt_len, device, generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with torch.no_grad(), autocast:
        sample(model, prompt, min(length, 8), generator=generator)  # compile prefill and decode kernels
        cached = timed_cached(model, prompt, length, device)
        if args.top_kernels:  # one profiled short call: its GPU time is nearly all decoding steps
            from torch.profiler import ProfilerActivity, profile

            steps = min(length, 65)
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                sample(model, prompt, steps, generator=generator)
                sync(device)
            print(f"\n{job}: GPU kernels per decoding step ({steps} positions profiled)\n"
                  f"{top_kernels(prof, args.top_kernels, per=steps - 1)}\n", flush=True)
        uncached = None
        if args.uncached_positions > 0:
            uncached = timed_uncached(model, prompt, min(args.uncached_positions, length), device)
    row = {
        "job": job + (" (smoke)" if args.smoke else " (quick)" if args.quick else ""),
        "config": name, "params_m": model.num_parameters() / 1e6, "layers": config.n_layer,
        "pattern": repr(config.pattern), "seq_len": config.seq_len, "batch": batch,
        "prompt": 1 if prompt_len is None else prompt_len, "positions": length, **cached,
        "bytes_per_s": batch / (cached["decode_ms"] * 1e-3),  # decoding steps, summed over the batch
        "uncached_ms": None if uncached is None else uncached * 1e3,
        "uncached_total_s_extrapolated": None if uncached is None else uncached * length,
        "uncached_positions_timed": args.uncached_positions,
        "target_kind": target_kind, "target": target,
    }
    value = row[target_kind]
    row["target_met"] = value <= target if target_kind == "total_s" else value >= target
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return row


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""
    lines = ["| job | params | layers | batch × positions | cached total s | prefill s | decode ms/pos | bytes/s "
             "| uncached ms/pos | uncached total s (extrapolated) | speed-up | target | met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['job']} | | | | {r['error']} | | | | | | | | |")
            continue
        unc = "" if r["uncached_ms"] is None else f"{r['uncached_ms']:.1f}"
        unc_total = "" if r["uncached_total_s_extrapolated"] is None else f"{r['uncached_total_s_extrapolated']:,.0f}"
        speedup = "" if r["uncached_ms"] is None else f"{r['uncached_ms'] / r['decode_ms']:,.0f}×"
        unit = "s" if r["target_kind"] == "total_s" else "bytes/s"
        target = f"{'≤' if unit == 's' else '≥'} {r['target']:,.0f} {unit}"
        lines.append(
            f"| {r['job']} | {r['params_m']:.1f}M | {r['layers']} | {r['batch']} × {r['positions']:,} | "
            f"{r['total_s']:.2f} | {r['prefill_s']:.2f} | {r['decode_ms']:.2f} | {r['bytes_per_s']:,.0f} | {unc} | "
            f"{unc_total} | {speedup} | {target} | {'yes' if r['target_met'] else 'no'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", nargs="*", default=list(JOBS), choices=list(JOBS), help="jobs to run (default all)")
    parser.add_argument("--uncached-positions", type=int, default=3,
                        help="positions of the uncached reference to time per job (0 = skip it; default 3)")
    parser.add_argument("--enwik8-positions", type=int, default=2048,
                        help="Enwik8 jobs: new positions at the end of the context (default 2048)")
    parser.add_argument("--quick", action="store_true", help="GPU smoke run: at most --quick-positions per job")
    parser.add_argument("--quick-positions", type=int, default=64)
    parser.add_argument("--top-kernels", type=int, default=0, help="print the N kernels with most GPU time per step")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script runs)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file (atomically)")
    args = parser.parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA GPU: run on the GPU machine, or use --smoke to check the script on the CPU")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny models)"
    rows: list[dict] = []
    for job in args.jobs:
        began = time.perf_counter()
        try:
            rows.append(run_job(job, args, device))
        except torch.OutOfMemoryError:
            rows.append({"job": job, "error": "out of memory"})
            torch.cuda.empty_cache()
        print(table(rows[-1:]).splitlines()[-1] + f"  ({time.perf_counter() - began:.0f} s)", file=sys.stderr,
              flush=True)
        if args.json:  # saved after every job: a run cut short keeps what it measured
            payload = {"device": where, "torch": torch.__version__, "quick": args.quick, "smoke": args.smoke,
                       "rows": rows}
            with atomic_write(args.json) as f:
                f.write(json.dumps(payload, indent=2).encode())
    print(f"\nSampling on {where}, torch {torch.__version__}, bf16 autocast, random weights; uncached = "
          f"{args.uncached_positions} timed positions per job, extrapolated to the whole job.\n")
    print(table(rows))
    return rows


if __name__ == "__main__":
    main()
