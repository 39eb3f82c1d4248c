"""Multi-GPU scaling and memory of the paper's large configs: 1 GPU vs 2 GPUs under DDP and FSDP2.

    python benchmarks/multi_gpu.py scaling          # Enwik8, ImageNet 64, audio 65,536: 1 GPU, 2×DDP, 2×FSDP2
    python benchmarks/multi_gpu.py context          # largest audio context that trains on 2 GPUs (FSDP2, doubling)
    python benchmarks/multi_gpu.py scaling --smoke  # the same plumbing on the CPU: gloo, tiny models, 2 processes

The driver starts one ``torchrun --standalone --nproc_per_node N`` job per (config, number of GPUs) and collects
what rank 0 writes; every row is saved to ``--json`` as soon as it is measured, so a run cut short keeps its rows.
Each job builds the network of ``configs/<name>.yaml`` (read with PyYAML: ``model.init_args`` → the plain
``SparseTransformer``; no LightningCLI, no jsonargparse) with the config's recompute flag and attention backend
(``auto`` = Triton on CUDA), and times the step the Trainer runs under the config: bf16 autocast, next-byte loss
over random bytes at the config's per-GPU batch, backward, gradient-norm clipping at the config's
``gradient_clip_val``, AdamW (foreach). DDP is torch's ``DistributedDataParallel``; FSDP2 is
``lightning_sparse.parallel.shard_blocks`` (``fully_shard`` per Block, then the root, bf16 parameters with fp32
gradient reduction), exactly what ``DensityModel.configure_model`` applies under ModelParallelStrategy.

Reported per row: tokens/s over all GPUs (median step after ``--warmup`` untimed steps; a step's time is the
slowest rank's), scaling against 1 GPU, peak allocated memory of the busiest GPU, and the bytes of parameters +
gradients + optimizer state that one GPU holds (its local shards under FSDP2), which sharding over 2 GPUs should halve.
The context search trains the audio 65,536 network (48 layers × 512) at batch 1 per GPU with stride 2^⌈log2(n)/2⌉
(the paper's l ≈ √n), doubling n from 65,536 until a step fails (out of memory or a hang past ``--timeout``);
1 untimed and 2 timed steps per context.

Estimated from the one-GPU step times in the README (not measured: never run on GPUs): ``scaling`` about 5
minutes (6 jobs; pass ``--configs`` to split it), ``context`` about 5–8 minutes up to the first failure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
SCALING_CONFIGS = ("enwik8", "imagenet64", "audio_65k")
OOM_MARKER = "lightning-sparse benchmark: out of memory on"
NETWORK_FIELDS = ("n_layer", "n_head", "d_model", "ff_mult", "qk_ratio", "dropout", "pattern", "position_shape",
                  "start_token", "attention_backend", "recompute")


# ----- the network of a YAML config, without the CLI ----------------------------------------------------------------


def read_config(name: str) -> dict:
    path = CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = ", ".join(p.stem for p in sorted(CONFIGS.glob("*.yaml")))
        raise SystemExit(f"{path} does not exist; choose from {names}")
    return yaml.safe_load(path.read_text())


def network_args(config: dict, seq_len: int | None = None, smoke: bool = False) -> dict:
    """``SparseTransformerConfig`` arguments of a config's model (as its LightningModule would pass them), JSON-able.

    Images: ``image_shape`` is the position shape and a start token is added (``ImageDensityModel``). ``seq_len``
    overrides the context (the pattern's stride then follows the paper's l ≈ √n). ``smoke`` shrinks the network
    for the CPU: 2 layers of width 64 (4 heads), context 1,024, the torch attention backend.
    """
    init = dict(config["model"].get("init_args") or {})
    args = {k: init[k] for k in NETWORK_FIELDS if k in init}
    args["seq_len"] = config["data"]["init_args"]["seq_len"]
    if "image_shape" in init:
        args["position_shape"], args["start_token"] = list(init["image_shape"]), True
    if smoke:
        args.update(n_layer=2, n_head=4, d_model=64, attention_backend="torch", seq_len=seq_len or 1024)
        args.pop("position_shape", None)
        args["pattern"] = rescaled_pattern(args["pattern"], stride_for(args["seq_len"]) if seq_len else 32)
    elif seq_len is not None:
        args["seq_len"] = seq_len
        args["pattern"] = rescaled_pattern(args["pattern"], stride_for(seq_len))
        args.pop("position_shape", None)  # (n / stride, stride), derived from the pattern
    return args


def stride_for(n: int) -> int:
    """2^⌈log2(n)/2⌉: the paper's l ≈ √n (256 at 65,536, 512 at 262,144, 1,024 at 1,048,576)."""
    return 1 << math.ceil(math.log2(n) / 2)


def rescaled_pattern(pattern: dict, stride: int) -> dict:
    """The same pattern class at another stride (Fixed keeps its summary at a quarter of the stride)."""
    args = dict(pattern.get("init_args") or {})
    args["stride"] = stride
    if "summary" in args:
        args["summary"] = max(1, stride // 4)
    return {"class_path": pattern["class_path"], "init_args": args}


def build_network(args: dict, device: torch.device) -> torch.nn.Module:
    from lightning_sparse.model import SparseTransformer, SparseTransformerConfig
    from lightning_sparse.yaml_objects import instantiate

    resolved = {k: instantiate(v) for k, v in args.items()}
    with torch.device(device):
        return SparseTransformer(SparseTransformerConfig(**resolved))


# ----- one torchrun job ---------------------------------------------------------------------------------------------


def local_bytes(tensors) -> int:
    """Bytes of the tensors this process holds (a DTensor's local shard)."""
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def state_bytes(network: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters, gradients and optimizer state held by this process."""
    params = list(network.parameters())
    optim = [v for s in optimizer.state.values() for v in s.values()]
    return {"params": local_bytes(params), "grads": local_bytes(p.grad for p in params), "optim": local_bytes(optim)}


def worker(job: dict) -> None:
    """Time ``job["modes"]`` on this process group; rank 0 writes the rows to ``job["out"]`` after every mode.

    Out of memory on any rank ends the job at once (``os._exit``: torchrun stops the other ranks, which could
    otherwise wait in a collective until the process-group timeout); the driver marks the modes left as failed.
    """
    import torch.distributed as dist
    import torch.nn.functional as F

    from lightning_sparse import parallel

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    cuda = not job["smoke"]
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=job["timeout"]))
    rows = []
    for mode in job["modes"]:
        torch.manual_seed(0)
        row = {"config": job["name"], "mode": mode, "gpus": world, "batch": job["batch"],
               "seq_len": job["network"]["seq_len"]}
        try:
            row.update(measure(job, mode, device, rank, world, parallel, F))
        except torch.OutOfMemoryError:
            # The other ranks may wait in a collective forever: leave at once, torchrun then stops them all.
            print(f"{OOM_MARKER} rank {rank}, {mode}", file=sys.stderr, flush=True)
            os._exit(3)
        rows.append(row)
        if cuda:
            torch.cuda.empty_cache()
        if rank == 0:  # after every mode, so a later failure keeps the rows measured before it
            Path(job["out"]).write_text(json.dumps(rows))
            print(json.dumps(row), file=sys.stderr, flush=True)
    dist.destroy_process_group()


def measure(job: dict, mode: str, device: torch.device, rank: int, world: int, parallel, F) -> dict:
    import torch.distributed as dist

    cuda = device.type == "cuda"
    network = build_network(job["network"], device)
    n_params = sum(p.numel() for p in network.parameters())
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if cuda else None)
    elif mode == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("data_parallel",))
        parallel.shard_blocks(network, mesh, parallel.mixed_precision_policy("bf16-mixed" if cuda else "32-true"))
        model = network
    elif mode == "single":
        model = network
    else:
        raise ValueError(f"unknown mode {mode!r}: single, ddp or fsdp2")
    params = list(network.parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.01},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=1e-4)
    seq_len, start = job["network"]["seq_len"], bool(job["network"].get("start_token"))
    generator = torch.Generator(device=device).manual_seed(rank)
    data = torch.randint(0, 256, (job["batch"], seq_len + 1), device=device, generator=generator)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    held: dict[str, int] = {}

    def step(account: bool) -> None:
        inputs, targets = data[:, :-1], data[:, 1:]
        if start:
            inputs = torch.cat([torch.full_like(inputs[:, :1], 256), inputs[:, 1:]], dim=1)
        with autocast:
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, 256), targets.reshape(-1))
        loss.backward()
        if job["clip"]:
            torch.nn.utils.clip_grad_norm_(params, job["clip"])
        optimizer.step()
        if account:
            held.update(state_bytes(network, optimizer))
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    for _ in range(job["warmup"]):
        step(account=False)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(job["steps"]):
        begin = time.perf_counter()
        step(account=i == job["steps"] - 1)
        sync()
        times.append(time.perf_counter() - begin)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)  # a step ends when its slowest rank ends
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) if cuda else 0], dtype=torch.float64, device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    state = torch.tensor([held["params"], held["grads"], held["optim"]], dtype=torch.float64, device=device)
    dist.all_reduce(state, op=dist.ReduceOp.MAX)
    step_s = statistics.median(slowest.tolist())
    return {
        "params": n_params,
        "step_ms": step_s * 1e3,
        "tokens_per_s": world * job["batch"] * seq_len / step_s,
        "peak_gib": peak.item() / 2**30 if cuda else None,
        "state_mib": state.sum().item() / 2**20,
        "state_split_mib": {k: round(v / 2**20, 2) for k, v in zip(("params", "grads", "optim"), state.tolist(),
                                                                    strict=True)},
    }


# ----- the driver ---------------------------------------------------------------------------------------------------


def launch(job: dict, nproc: int, timeout: float) -> list[dict]:
    """Run one torchrun job of ``nproc`` processes on this machine; its rows, or one failed row per mode."""
    with tempfile.TemporaryDirectory() as tmp:
        job = {**job, "out": str(Path(tmp) / "rows.json")}
        spec = Path(tmp) / "job.json"
        spec.write_text(json.dumps(job))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   str(Path(__file__).resolve()), "--worker", str(spec)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1" if job["smoke"] else "4")}
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return [{**failed_row(job, m, nproc), "error": f"no result within {timeout:.0f} s"} for m in job["modes"]]
        rows_file = Path(job["out"])
        rows = json.loads(rows_file.read_text()) if rows_file.is_file() else []
        if result.returncode != 0 or len(rows) < len(job["modes"]):
            stderr = result.stderr or ""
            print("\n".join(stderr.strip().splitlines()[-3:]), file=sys.stderr)
            error = "out of memory" if OOM_MARKER in stderr or "OutOfMemory" in stderr else f"exit {result.returncode}"
            rows += [{**failed_row(job, m, nproc), "error": error} for m in job["modes"][len(rows):]]
        return rows


def failed_row(job: dict, mode: str, nproc: int) -> dict:
    return {"config": job["name"], "mode": mode, "gpus": nproc, "batch": job["batch"],
            "seq_len": job["network"]["seq_len"]}


def save(path: Path, payload: dict) -> None:
    from lightning_sparse.atomic import atomic_write

    with atomic_write(path) as f:
        f.write(json.dumps(payload, indent=2).encode())


def scaling_table(rows: list[dict]) -> str:
    lines = ["| config | params | GPUs | strategy | batch/GPU | step ms | tokens/s | scaling | peak GiB/GPU | "
             "params+grads+optimizer MiB/GPU |", "|---|---|---|---|---|---|---|---|---|---|"]
    base = {r["config"]: r["tokens_per_s"] for r in rows if r["mode"] == "single" and "error" not in r}
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | | {r['gpus']} | {r['mode']} | {r['batch']} | {r['error']} | | | | |")
            continue
        scale = f"{r['tokens_per_s'] / base[r['config']]:.2f}×" if r["config"] in base else ""
        peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.1f}M | {r['gpus']} | {r['mode']} | {r['batch']} | "
                     f"{r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} | {scale} | {peak} | {r['state_mib']:,.1f} |")
    return "\n".join(lines)


def context_table(rows: list[dict]) -> str:
    lines = ["| context | stride | GPUs | strategy | step ms | tokens/s | peak GiB/GPU | result |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seq_len']:,} | {r['stride']} | {r['gpus']} | {r['mode']} | | | | {r['error']} |")
        else:
            peak = "n/a" if r["peak_gib"] is None else f"{r['peak_gib']:.1f}"
            lines.append(f"| {r['seq_len']:,} | {r['stride']} | {r['gpus']} | {r['mode']} | {r['step_ms']:.0f} | "
                         f"{r['tokens_per_s']:,.0f} | {peak} | trains |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["scaling", "context", "all"], nargs="?", default="all")
    parser.add_argument("--configs", nargs="*", default=list(SCALING_CONFIGS), help="configs for the scaling table")
    parser.add_argument("--gpus", type=int, default=2, help="the multi-GPU size (default 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (Triton compilation)")
    parser.add_argument("--max-context", type=int, default=1 << 22, help="stop the doubling search here")
    parser.add_argument("--timeout", type=float, default=420.0,
                        help="seconds per torchrun job before it counts as failed")
    parser.add_argument("--smoke", "--dry-run", action="store_true",
                        help="CPU, gloo, tiny models (2 layers × 64, context 1,024; search up to 2,048): "
                        "checks the plumbing")
    parser.add_argument("--json", type=Path, default=None,
                        help="rows are saved here as they come (default benchmarks/results/multi_gpu[_smoke].json)")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # a torchrun process of one job
    args = parser.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker.read_text()))
        return {}
    if not args.smoke and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"needs {args.gpus} CUDA GPUs, found {torch.cuda.device_count()}; --smoke checks the script "
                         "on the CPU")
    if args.smoke:
        args.steps, args.warmup, args.max_context = 2, 1, min(args.max_context, 2048)
    out = args.json or ROOT / "benchmarks" / "results" / f"multi_gpu{'_smoke' if args.smoke else ''}.json"
    where = "CPU (smoke: gloo, tiny models)" if args.smoke else f"{args.gpus}× {torch.cuda.get_device_name(0)}"
    payload: dict = {"device": where, "torch": torch.__version__, "command": " ".join(sys.argv), "scaling": [],
                     "context": []}
    common = {"smoke": args.smoke, "steps": args.steps, "warmup": args.warmup, "timeout": args.timeout}

    if args.what in ("scaling", "all"):
        for name in args.configs:
            config = read_config(name)
            base = {**common, "name": name, "network": network_args(config, smoke=args.smoke),
                    "batch": 1 if args.smoke else int(config["data"]["init_args"].get("batch_size", 1)),
                    "clip": config.get("trainer", {}).get("gradient_clip_val")}
            for nproc, modes in ((1, ["single"]), (args.gpus, ["ddp", "fsdp2"])):
                for row in launch({**base, "modes": modes}, nproc, args.timeout):
                    payload["scaling"].append(row)
                    print(scaling_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
                    save(out, payload)

    if args.what in ("context", "all"):
        config = read_config("audio_65k")
        n = 1024 if args.smoke else config["data"]["init_args"]["seq_len"]
        while n <= args.max_context:
            # 1 untimed + at most 2 timed steps per context: long contexts take seconds per step
            job = {**common, "steps": min(args.steps, 2), "warmup": 1, "name": "audio_65k",
                   "network": network_args(config, seq_len=n, smoke=args.smoke),
                   "batch": 1, "clip": config.get("trainer", {}).get("gradient_clip_val"), "modes": ["fsdp2"]}
            (row,) = launch(job, args.gpus, args.timeout)
            row["stride"] = job["network"]["pattern"]["init_args"]["stride"]
            payload["context"].append(row)
            print(context_table([row]).splitlines()[-1], file=sys.stderr, flush=True)
            save(out, payload)
            if "error" in row:
                break
            n *= 2
        trained = [r["seq_len"] for r in payload["context"] if "error" not in r]
        payload["largest_context"] = max(trained) if trained else None

    save(out, payload)
    print(f"\n{where}, torch {torch.__version__}; rows in {out}\n")
    if payload["scaling"]:
        print(scaling_table(payload["scaling"]) + "\n")
    if payload["context"]:
        print(context_table(payload["context"]))
        print(f"\nLargest audio context that trains on {args.gpus} GPUs (FSDP2, batch 1/GPU): "
              f"{payload['largest_context']:,}" if payload["largest_context"] else "\nNo audio context trained.")
    return payload


if __name__ == "__main__":
    main()
