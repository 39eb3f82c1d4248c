"""One training/validation run of a tiny text model under a chosen strategy, for the multi-process tests.

Run as a script (Lightning's launcher re-runs this file once per extra process):

    python tests/parallel_run.py --strategy fsdp2 --devices 2 --batch 4 --steps 4 --out run.json

Data is fixed and in order (no shuffling): with ``--devices 2 --batch 4`` rank r gets samples r, r+2, …, so each
step's global batch is exactly the batch of ``--devices 1 --batch 8``.
Rank 0 writes ``--out``: the global (all-rank mean) training loss of every step, the final ``val/bpd`` and which
sharding was really applied.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from lightning_sparse import parallel
from lightning_sparse.kernels import Fixed
from lightning_sparse.sample_logging import TextSampleLogger
from lightning_sparse.text import TextDensityModel

SEQ_LEN, TRAIN_SAMPLES, VAL_SAMPLES = 32, 16, 8  # 2 steps per epoch at a global batch of 8


def fixed_bytes(n: int, seed: int) -> torch.Tensor:
    """``n`` windows of ``SEQ_LEN + 1`` bytes from a seeded order-1 Markov source (learnable, deterministic)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(0, 7, (n, SEQ_LEN + 1), generator=g)
    return (steps.cumsum(dim=1) * 37 % 256).to(torch.uint8)


class FixedData(L.LightningDataModule):
    """Training and validation windows in a fixed order; rank r of w takes samples r, r+w, r+2w, … (no shuffling)."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.train, self.val = list(fixed_bytes(TRAIN_SAMPLES, 1)), list(fixed_bytes(VAL_SAMPLES, 2))

    def _loader(self, samples: list[torch.Tensor]) -> DataLoader:
        rank, world = self.trainer.global_rank, self.trainer.world_size
        sampler = DistributedSampler(samples, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(samples, batch_size=self.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val)


class GlobalLoss(Callback):
    """Collects the mean training loss over all ranks after every step (a collective: every rank calls it)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach().float(), reduce_op="mean")
        self.losses.append(float(loss))


def strategy_from_name(name: str, state_dict_type: str, sharding: str, devices: int):
    """The strategy object of a short name: single, ddp, fsdp (SparseFSDPStrategy) or fsdp2 (ModelParallelStrategy)."""
    if name in ("single", "ddp"):
        return "auto" if name == "single" else "ddp"
    if name == "fsdp":
        return parallel.SparseFSDPStrategy(sharding_strategy=sharding, state_dict_type=state_dict_type)
    if name == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        world = int(os.environ.get("WORLD_SIZE", devices))  # set by torchrun / by Lightning in its children
        return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1)
    raise ValueError(f"unknown strategy {name!r}")


def main(args: argparse.Namespace) -> None:
    L.seed_everything(0, workers=True)
    model = TextDensityModel(
        seq_len=SEQ_LEN,
        n_layer=2,
        n_head=2,
        d_model=64,  # head width 32: the smallest the triton kernels take (the GPU tests run them)
        pattern=Fixed(8, 2),
        recompute=args.recompute,
        lr=3e-3,
        warmup_steps=2,
        decay_steps=100,
    )
    data = FixedData(args.batch)
    losses = GlobalLoss()
    callbacks = [losses]
    if args.sample:  # sampling after each validation: forwards on every rank, rank 0 writes
        callbacks.append(TextSampleLogger(length=8, prompt_length=4))
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(args.ckpt_dir, "{step}", every_n_train_steps=2, save_top_k=-1))
    trainer = L.Trainer(
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy_from_name(args.strategy, args.state_dict_type, args.sharding, args.devices),
        precision=args.precision,
        max_steps=args.steps,
        gradient_clip_val=0.1,  # below the gradient norm (≈0.5 at the start): clipping is active in every step
        use_distributed_sampler=False,  # FixedData splits the samples itself, in order
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=bool(args.ckpt_dir),
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    if args.validate:
        trainer.validate(model, data, ckpt_path=args.validate)
    else:
        trainer.fit(model, data, ckpt_path=args.resume)
        trainer.validate(model, data)
    net = model.model
    record = {
        "losses": losses.losses,
        "val_bpd": float(trainer.callback_metrics["val/bpd"]),
        "world_size": trainer.world_size,
        "fsdp2_sharded": parallel.is_sharded(net),
        "fsdp1_units": sum(isinstance(m, FullyShardedDataParallel) for m in model.modules()),
        "blocks_recompute": [b.recompute for b in net.blocks],
        "global_step": trainer.global_step,
        # parameters in the weight-decay group (must not depend on the strategy; FSDP1 flattens parameters)
        "decay_params": sum(len(g["params"]) for g in trainer.optimizers[0].param_groups if g["weight_decay"] > 0)
        if trainer.optimizers
        else None,
    }
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(record))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="single", choices=["single", "ddp", "fsdp", "fsdp2"])
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--precision", default="32-true")
    p.add_argument("--batch", type=int, default=8, help="samples per process per step")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--recompute", action="store_true")
    p.add_argument("--sample", action="store_true", help="sample 8 bytes after every validation")
    p.add_argument("--state-dict-type", default="sharded", choices=["full", "sharded"], help="fsdp only")
    p.add_argument("--sharding", default="FULL_SHARD", help="fsdp only: FULL_SHARD, SHARD_GRAD_OP or HYBRID_SHARD")
    p.add_argument("--ckpt-dir", default=None, help="save a checkpoint every 2 steps (every epoch) here")
    p.add_argument("--resume", default=None, help="checkpoint to resume fit from")
    p.add_argument("--validate", default=None, help="only validate this checkpoint")
    p.add_argument("--out", required=True)
    return p.parse_args(argv)


if __name__ == "__main__":
    main(parse())
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Exit without interpreter teardown: a gloo/checkpoint thread still alive at exit can abort the process
    # ("terminate called without an active exception") after all work and the record were done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
