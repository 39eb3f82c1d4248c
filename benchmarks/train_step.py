"""Whole training steps of every paper config, sparse against dense FlashAttention, eager and compiled, in one run.

    python benchmarks/train_step.py --configs cifar10,enwik8,imagenet64,audio_65k      # ≈ 9 min on one H200
    python benchmarks/train_step.py --configs audio_262k,audio_1m
    python benchmarks/train_step.py --configs enwik8 --variants sparse-compiled,dense-compiled --steps 5
    python benchmarks/train_step.py --configs enwik8 --variants sparse-cudagraphs,sparse-cudagraphs+ordered-kv
    python benchmarks/train_step.py --configs enwik8 --tiles sweep.json  # a tile sweep's choices in a whole step
    python benchmarks/train_step.py --smoke                  # tiny models on the CPU: checks the script runs

For each config (``configs/<name>.yaml``, read with PyYAML and a small ``class_path`` resolver: no jsonargparse
needed) the LightningModule is built as configured (layers, widths, pattern, recompute, the config's own batch)
in up to four variants:

* ``sparse`` / ``sparse-compiled``: the config's pattern on its backend (``auto``: Triton on CUDA), eager or with
  ``compile=True`` (``torch.compile`` per residual block in ``configure_model``);
* ``dense`` / ``dense-compiled``: the same model with ``Dense()`` attention on the ``sdpa`` backend
  (``F.scaled_dot_product_attention(is_causal=True)``: FlashAttention), eager or compiled. Skipped where its
  estimated attention time alone exceeds ``--dense-limit-s`` (the output says so).
* ``*-cudagraphs``: compiled with ``mode="reduce-overhead"`` (CUDA graphs). A sparse variant with the suffix
  ``+ordered-dq`` (with ``--segment`` rows per summary key program) or ``+ordered-kv`` runs the fixed pattern's
  backward with that 5-product design (``kernels.tiles.ordered_tiles``): the experiment's A/B in a whole step.

One step is what the Trainer runs under the config: ``training_step`` on random bytes under bf16 autocast,
backward, gradient-norm clipping at ``gradient_clip_val``, a fused AdamW step. Reported: the first step (which
includes Triton JIT and, compiled, the ``torch.compile`` time: ``compile s`` = first step − median step), the
median of ``--steps`` steps after ``--warmup`` steps, tokens/s, model TFLOP/s (formula printed with the table),
peak memory, and the fraction of the step the GPU is busy: the union of kernel intervals of one profiled step
(torch.profiler) divided by the median step time. Rows print as they finish; JSON and Markdown are rewritten
atomically after every row (``--out``). ``--tiles`` puts the fastest tiles of a sweep (``attention.py --sweep
--json FILE``) in force for the whole run, so a sweep's choice is judged in a whole step before it becomes a default.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import importlib.util
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from profiling import busy_fraction, idle_gaps, top_kernels  # benchmarks/profiling.py

from lightning_sparse.atomic import atomic_write
from lightning_sparse.kernels import Dense, FixedBlock, FixedSummary, Interleaved, Local, Pattern, StridedColumns
from lightning_sparse.kernels.tiles import BwdTiles, FwdTiles, ordered_tiles, tile_override
from lightning_sparse.yaml_objects import instantiate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PAPER_CONFIGS = ("cifar10", "enwik8", "imagenet64", "audio_65k", "audio_262k", "audio_1m")
VARIANTS = ("sparse", "sparse-compiled", "dense", "dense-compiled")
CUDA_GRAPH_VARIANTS = ("sparse-cudagraphs", "dense-cudagraphs")  # compiled with mode="reduce-overhead"
ORDERED = ("+ordered-dq", "+ordered-kv")  # suffixes of a sparse variant: the fixed backward's 5-product designs
DENSE_TFLOPS_ESTIMATE = 400e12  # H200 dense causal SDPA forward+backward, bf16 (benchmarks/attention.py)
FLOP_FORMULA = (
    "model FLOPs per step = 6·N·T + Σ_layers 6·B·pairs·(d_qk + d_v): N = parameters without the token and position "
    "embeddings (lookups), T = batch·seq_len tokens, pairs = allowed (query, key) pairs of the layer's pattern per "
    "head (sparse: counted exactly from the pattern; dense: n(n+1)/2 ≈ n²/2), d_qk / d_v = the query/key and value "
    "widths summed over heads; 6 = 2 (multiply-add) × 3 (forward + backward); recomputation is not counted"
)


# ----------------------------------------------------------------------------------------------- building models


def data_args(config: dict) -> dict:
    """The data module's init_args, with the module's defaults filled in for what the YAML leaves out."""
    import inspect

    module, _, name = config["data"]["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    args = {k: p.default for k, p in inspect.signature(cls).parameters.items() if p.default is not p.empty}
    args.update(config["data"].get("init_args") or {})
    return args


def model_args(config: dict, smoke: bool) -> dict:
    """The model's init_args as the CLI would pass them (seq_len linked from the data); ``smoke`` shrinks them."""
    args = dict(config["model"].get("init_args") or {})
    args["seq_len"] = data_args(config)["seq_len"]
    if smoke:
        heads = min(args.get("n_head", 4), 4)
        args.update(n_layer=2, n_head=heads, d_model=16 * heads, attention_backend="torch")
        if "image_shape" in args:
            args["image_shape"] = [8, 8, 3]
            args["seq_len"] = 192
            args["pattern"] = {"class_path": "lightning_sparse.kernels.Strided", "init_args": {"stride": 24}}
        elif args["seq_len"] > 1024:
            args["seq_len"] = 1024
            pattern = args.get("pattern") or {}
            init = dict(pattern.get("init_args") or {})
            init["stride"] = 32
            if "summary" in init:
                init["summary"] = 8
            args["pattern"] = {"class_path": pattern["class_path"], "init_args": init}
    return args


def split_variant(variant: str) -> tuple[str, str | None]:
    """(the variant without a ``+ordered-*`` tile suffix, the suffix's design "dq" / "kv" or None)."""
    for suffix in ORDERED:
        if variant.endswith(suffix):
            return variant.removesuffix(suffix), suffix.removeprefix("+ordered-")
    return variant, None


def build(config: dict, variant: str, smoke: bool) -> Any:
    """The config's LightningModule for ``variant`` (dense: ``Dense()`` on sdpa, same position embeddings)."""
    args = model_args(config, smoke)
    variant, _ = split_variant(variant)  # the tiles, not the model, differ
    args["compile"] = variant.endswith(("-compiled", "-cudagraphs"))
    # the variant, not the config, picks the mode: -compiled is the default mode, -cudagraphs "reduce-overhead"
    args["compile_mode"] = "reduce-overhead" if variant.endswith("-cudagraphs") else None
    path = config["model"]["class_path"]
    module = instantiate({"class_path": path, "init_args": args})
    if variant.startswith("dense"):
        sparse_shape = module.config.position_shape
        args.update(pattern={"class_path": "lightning_sparse.kernels.Dense"}, attention_backend="sdpa")
        module = instantiate({"class_path": path, "init_args": args})
        if module.config.position_shape != sparse_shape:  # text/audio derive it from the pattern's stride
            module = instantiate({"class_path": path, "init_args": {**args, "position_shape": list(sparse_shape)}})
    return module


# ----------------------------------------------------------------------------------------------- FLOPs


def part_pairs(part: Pattern, n: int) -> int:
    """Allowed (query, key) pairs of one primitive part (a uniform pattern) at length ``n``, counted exactly."""
    i = np.arange(n, dtype=np.int64)
    if isinstance(part, Dense):
        return n * (n + 1) // 2
    if isinstance(part, Local):
        return int(np.minimum(i + 1, part.width).sum())
    if isinstance(part, StridedColumns):
        return int((i // part.stride + int(part.include_self)).sum())
    if isinstance(part, FixedBlock):
        return int((i % part.stride + 1).sum())
    if isinstance(part, FixedSummary):
        stride, c, s = part.stride, part.summary, part.summary_start(0)
        limit = (i // stride) * stride - 1 if part.previous_blocks_only else i  # last key position a query may see
        count = limit + 1  # keys 0 … limit, of which c per block of `stride` from offset s
        return int(((count // stride) * c + np.clip(count % stride - s, 0, c)).sum())
    raise ValueError(f"no pair count for {part!r}")


def pattern_pairs(pattern: Pattern, n: int) -> float:
    """Allowed pairs per head, averaged over the head groups (heads are spread evenly over them)."""
    groups = [pattern.head_group(g) for g in range(pattern.head_groups)]
    return statistics.fmean(sum(part_pairs(p, n) for p in g.parts()) for g in groups)


def model_flops(module: Any, batch: int) -> tuple[float, float]:
    """(total, attention) model FLOPs of one training step, by :data:`FLOP_FORMULA`."""
    cfg, net = module.config, module.model
    embed = sum(p.numel() for m in (net.token_emb, net.pos_emb) for p in m.parameters())
    n = cfg.seq_len
    schedule = cfg.pattern.patterns if isinstance(cfg.pattern, Interleaved) else (cfg.pattern,)
    pairs = {p: pattern_pairs(p, n) for p in schedule}
    attention = sum(6 * batch * pairs[cfg.layer_pattern(r)] * (cfg.d_qk + cfg.d_model) for r in range(cfg.n_layer))
    return 6 * (net.num_parameters() - embed) * batch * n + attention, attention


# ----------------------------------------------------------------------------------------------- measuring


def measure(name: str, config: dict, variant: str, args: argparse.Namespace, device: torch.device) -> dict:
    """Build, warm up, time and profile one (config, variant); returns a row."""
    cuda = device.type == "cuda"
    batch = 1 if args.smoke else data_args(config)["batch_size"]
    trainer_cfg = config.get("trainer", {})
    precision = str(trainer_cfg.get("precision", "32-true"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision.startswith("bf16") and cuda)
    clip = trainer_cfg.get("gradient_clip_val")
    compiled = split_variant(variant)[0].endswith(("-compiled", "-cudagraphs"))
    torch._dynamo.reset()
    module = build(config, variant, args.smoke)
    with torch.device(device):
        module.configure_model()
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": module.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=module.lr, betas=module.betas, fused=cuda)
    n = module.config.seq_len
    length = n + (0 if module.config.start_token else 1)
    data = torch.randint(0, 256, (batch, length), dtype=torch.uint8, device=device)
    flops, attention_flops = model_flops(module, batch)

    def step() -> None:
        with autocast:
            loss = module.training_step(data, 0)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    first = timed()
    for _ in range(args.warmup - 1):
        timed()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = [timed() for _ in range(args.steps)]
    step_s = statistics.median(times)
    busy, kernels = None, None
    if cuda and not args.no_profile:
        from torch.profiler import ProfilerActivity, profile

        try:
            with profile(activities=[ProfilerActivity.CUDA]) as prof:  # device activity only: fewer events to parse
                timed()
            busy_s, kernels = busy_fraction(prof)
            if args.top_kernels:
                print(f"\n{name} {variant}: GPU kernels of one step\n{top_kernels(prof, args.top_kernels)}\n", flush=True)
            busy = None if busy_s is None else min(1.0, busy_s / step_s)
            if args.gaps:  # another step, with host events too (slower to record, so not the busy fraction's)
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    timed()
                print(f"\n{name} {variant}: where the GPU idled in one step (profiled with host events)\n"
                      f"{idle_gaps(prof, args.gaps)}\n", flush=True)
        except Exception:  # keep the timing row; the busy column stays empty
            traceback.print_exc()
    row = {
        "config": name + (" (smoke)" if args.smoke else ""),
        "variant": variant,
        "pattern": repr(module.config.pattern),
        "backend": module.config.attention_backend,
        "params": module.model.num_parameters(),
        "batch": batch,
        "seq_len": n,
        "step_ms": step_s * 1e3,
        "steps_ms": [t * 1e3 for t in times],
        "first_step_s": first,
        "compile_s": max(0.0, first - step_s) if compiled else None,
        "tokens_per_s": batch * n / step_s,
        "model_tflops": flops / step_s / 1e12,
        "attention_share_of_flops": attention_flops / flops,
        "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "gpu_busy": busy,
        "kernels_per_step": kernels,
    }
    return row


def dense_estimate_s(config: dict, smoke: bool) -> float:
    """Lower bound on the dense model's attention time per step at :data:`DENSE_TFLOPS_ESTIMATE`."""
    args = model_args(config, smoke)
    n, layers, d = args["seq_len"], args.get("n_layer", 4), args.get("d_model", 256)
    batch = 1 if smoke else data_args(config)["batch_size"]
    d_qk = args.get("qk_ratio", 1.0) * d
    return layers * 6 * batch * n * (n + 1) / 2 * (d_qk + d) / DENSE_TFLOPS_ESTIMATE


# ----------------------------------------------------------------------------------------------- output


def fmt(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table; the dense rows carry the sparse/dense step-time ratio of the same compile mode."""
    lines = [
        "| config | variant | pattern | batch | step ms | sparse speed-up | tokens/s | model TFLOP/s | peak GiB | "
        "GPU busy | GPU ops/step | first step s | compile s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    steps = {(r["config"], r["variant"]): r.get("step_ms") for r in rows}
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['config']} | {r['variant']} | | | {r.get('error') or r['skipped']} | | | | | | | | |")
            continue
        speedup = ""
        if r["variant"].startswith("dense"):
            sparse = steps.get((r["config"], r["variant"].replace("dense", "sparse")))
            speedup = f"{r['step_ms'] / sparse:.2f}×" if sparse else ""
        busy = "" if r["gpu_busy"] is None else f"{100 * r['gpu_busy']:.0f}%"
        lines.append(
            f"| {r['config']} | {r['variant']} | `{r['pattern']}` | {r['batch']} | {r['step_ms']:.1f} | {speedup} | "
            f"{r['tokens_per_s']:,.0f} | {r['model_tflops']:.1f} | {fmt(r['peak_gib'], '.1f')} | {busy} | "
            f"{fmt(r['kernels_per_step'], ',')} | {r['first_step_s']:.1f} | {fmt(r['compile_s'], '.1f')} |"
        )
    return "\n".join(lines)


def sweep_choices(path: Path, stack: contextlib.ExitStack) -> list[str]:
    """Enter a ``tile_override`` for each fastest-tiles record of a sweep's JSON (``attention.py --sweep --json``);
    returns them as DEFAULTS-style lines for the run's header."""
    try:
        records = [r for r in json.loads(path.read_text())["sweep"] if "tiles" in r]
        choices = [(r["kind"], r["layout"], (r["d_qk"], r["d_v"]), (FwdTiles if r["kind"] == "fwd" else BwdTiles)(
            **r["tiles"])) for r in records]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SystemExit(f"--tiles {path}: not a sweep's JSON ({type(err).__name__}: {err}); write one with "
                         "`python benchmarks/attention.py --sweep --json FILE`") from None
    if not choices:
        raise SystemExit(f"--tiles {path}: no fastest-tiles records in its 'sweep' list (was it written by --sweep?)")
    for kind, layout, widths, tiles in choices:
        stack.enter_context(tile_override(**{kind: tiles}, layout=layout, widths=widths))
    return [f"({kind!r}, {layout!r}, {widths[0]}, {widths[1]}): {tiles!r}" for kind, layout, widths, tiles in choices]


def save(out: Path, header: dict, rows: list[dict]) -> None:
    """JSON and Markdown of everything so far, each written atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out.with_suffix(".json")) as f:
        f.write(json.dumps({**header, "rows": rows}, indent=2).encode())
    text = f"{header['title']}\n\n{FLOP_FORMULA}.\n\n{table(rows)}\n"
    with atomic_write(out.with_suffix(".md")) as f:
        f.write(text.encode())


_TILES = contextlib.ExitStack()  # --tiles: the sweep's choices, in force until the process ends


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(PAPER_CONFIGS), help="comma-separated names under configs/")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after warm-up (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (JIT, compile), at least 1")
    parser.add_argument("--dense-limit-s", type=float, default=15.0,
                        help="skip dense variants whose attention alone would take longer per step (estimate at "
                             f"{DENSE_TFLOPS_ESTIMATE / 1e12:.0f} TFLOP/s)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profiled step (no GPU-busy column)")
    parser.add_argument("--top-kernels", type=int, default=0, help="print the N kernels with most GPU time per step")
    parser.add_argument("--gaps", type=int, default=0,
                        help="print the N longest GPU idle gaps of a step and the host op during each")
    parser.add_argument("--out", type=Path, default=None,
                        help="writes OUT.json and OUT.md after every row (default: "
                             "benchmarks/results/train_step_<configs>)")
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU, batch 1: checks the script")
    parser.add_argument("--segment", type=int, default=2048,
                        help=f"the {ORDERED[0]} variants' query rows per summary key program (BwdTiles.segment)")
    parser.add_argument("--tiles", type=Path, default=None,
                        help="a sweep's JSON (attention.py --sweep --json): its fastest tiles in force for the run")
    args = parser.parse_args(argv)
    names = [c for c in args.configs.split(",") if c]
    if args.out is None:
        args.out = ROOT / "benchmarks" / "results" / f"train_step_{'-'.join(names)}{'_smoke' if args.smoke else ''}"
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        base, _ = split_variant(v)
        if base not in VARIANTS + CUDA_GRAPH_VARIANTS or (base != v and not base.startswith("sparse")):
            raise SystemExit(f"--variants: {v!r} is not one of {', '.join(VARIANTS + CUDA_GRAPH_VARIANTS)}, or a "
                             f"sparse one with a suffix {' or '.join(ORDERED)}")
    if args.warmup < 1 or args.steps < 1:
        raise SystemExit("--warmup and --steps must be at least 1")
    if args.gaps < 0 or args.top_kernels < 0:
        raise SystemExit(f"--gaps and --top-kernels count table rows: 0 (none) or more, got {args.gaps}, "
                         f"{args.top_kernels}")
    if args.smoke:
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        raise SystemExit("no CUDA GPU: run on the GPU machine, or use --smoke to check the script on the CPU")
    configs = {}
    for name in names:
        path = CONFIGS / f"{name}.yaml"
        if not path.is_file():
            raise SystemExit(f"{path} does not exist; choose from {', '.join(PAPER_CONFIGS)}")
        configs[name] = yaml.safe_load(path.read_text())
    warnings.filterwarnings("ignore", message=".*self.log.*")  # training_step logs; no Trainer is attached
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke: tiny models)"
    triton = importlib.util.find_spec("triton")
    chosen_tiles = sweep_choices(args.tiles, _TILES) if args.tiles else []
    header = {
        "title": f"Training step per paper config on {where}; torch {torch.__version__}, triton "
                 f"{importlib.import_module('triton').__version__ if triton else 'absent'}; bf16 autocast, fused "
                 f"AdamW, the configs' batch and recompute; median of {args.steps} steps after {args.warmup}"
                 f"{f'; tiles from {args.tiles.name}' if chosen_tiles else ''}.",
        "flop_formula": FLOP_FORMULA,
        "argv": sys.argv[1:] if argv is None else argv,
        "tiles": chosen_tiles,
    }
    print(header["title"], "\n" + FLOP_FORMULA + ".\n", flush=True)
    if chosen_tiles:
        print("tiles in force:\n  " + "\n  ".join(chosen_tiles) + "\n", flush=True)
    print("\n".join(table([]).splitlines()[:2]), flush=True)
    rows: list[dict] = []
    for name, config in configs.items():
        for variant in variants:
            estimate = dense_estimate_s(config, args.smoke) if variant.startswith("dense") else 0.0
            if estimate > args.dense_limit_s:
                row = {"config": name, "variant": variant,
                       "skipped": f"skipped: dense attention alone ≈ {estimate:.0f} s/step (> --dense-limit-s)"}
            else:
                try:
                    _, design = split_variant(variant)
                    with ordered_tiles(design, args.segment) if design else contextlib.nullcontext():
                        row = measure(name, config, variant, args, device)
                except torch.OutOfMemoryError:
                    row = {"config": name, "variant": variant, "error": "out of memory"}
                except Exception as err:  # one failing variant must not cost the rest of the run; say what failed
                    traceback.print_exc()
                    row = {"config": name, "variant": variant, "error": f"{type(err).__name__}: {err}"[:300]}
                gc.collect()  # free this variant's model and optimizer before the next one
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(table(rows).splitlines()[-1], flush=True)
            save(args.out, header, rows)
    print(f"\n{table(rows)}\n\nwritten: {args.out.with_suffix('.json')}, {args.out.with_suffix('.md')}", flush=True)
    return rows


if __name__ == "__main__":
    main()
