"""Sharded training of the Sparse Transformer: FSDP (Lightning's ``FSDPStrategy``) and FSDP2
(``ModelParallelStrategy``).

The unit of sharding, wrapping, activation checkpointing and compilation is one residual
:class:`~lightning_sparse.model.Block` (:func:`block_classes`). Three ways to train on several GPUs, all through
``trainer.strategy`` in the YAML:

* ``ddp``: every GPU holds the whole model (nothing here is needed);
* :class:`SparseFSDPStrategy`: Lightning's FSDP with a Block auto-wrap policy, per-Block activation checkpointing
  and bf16 compute with fp32 gradient reduction;
* ``lightning.pytorch.strategies.ModelParallelStrategy``: ``DensityModel.configure_model`` calls
  :func:`shard_blocks` (``fully_shard`` per Block, then the root) with :func:`mixed_precision_policy`.

Sharded checkpoints are folders; :func:`consolidate_checkpoint` turns one into a single ``.ckpt`` file that
``validate``/``test`` read on one device (``python -m lightning_sparse.parallel FOLDER``).
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy
from torch import nn

from lightning_sparse.atomic import atomic_write
from lightning_sparse.model import Block, SparseTransformer

__all__ = [
    "SparseFSDPStrategy",
    "block_classes",
    "built_ndim",
    "clip_sharded_grad_norm",
    "consolidate_checkpoint",
    "fsdp_wrap_classes",
    "hand_over_recompute",
    "is_sharded",
    "mixed_precision_policy",
    "remember_ndims",
    "shard_blocks",
]

log = logging.getLogger(__name__)


def block_classes() -> set[type[nn.Module]]:
    """The module classes that are one unit of sharding, checkpointing and compilation: the residual Block."""
    return {Block}


def fsdp_wrap_classes() -> set[type[nn.Module]]:
    """FSDP1 units: every Block, and the network itself for the rest (embeddings, final norm, head).

    The network being its own unit matters for sampling, which calls the network directly, outside the
    LightningModule's forward: an FSDP unit gathers its parameters whenever it is called.
    """
    return block_classes() | {SparseTransformer}


# ----- FSDP1: Lightning's FSDPStrategy -----------------------------------------------------------------------------


class SparseFSDPStrategy(FSDPStrategy):
    """Lightning's ``FSDPStrategy`` set up for this model: every residual Block is one FSDP unit (and the network, for
    the embeddings and head; :func:`fsdp_wrap_classes`) and by default one activation-checkpointing unit, and bf16
    precision computes in bf16 but reduces gradients in fp32.

    Plain ``FSDPStrategy`` reduces gradients in bf16 under ``precision: bf16-mixed``; with this class the
    parameters and buffers are cast to bf16 for compute and the gradient reduce-scatter runs in fp32.

    Args:
        sharding_strategy: "FULL_SHARD" (ZeRO-3: parameters, gradients, optimizer state sharded), "SHARD_GRAD_OP"
            (ZeRO-2: parameters kept whole between forward and backward), "HYBRID_SHARD" (full sharding inside a
            node, replication across nodes) or "NO_SHARD".
        state_dict_type: "full" (one file gathered on rank 0, readable anywhere) or "sharded" (a folder, one file
            per rank; see :func:`consolidate_checkpoint`).
        checkpoint_blocks: Recompute each Block in the backward pass (the strategy's activation-checkpointing policy).
            A model with ``recompute=True`` hands its own recomputation over to it (:func:`hand_over_recompute`).
        **kwargs: Every other ``FSDPStrategy`` argument (``cpu_offload``, ``mixed_precision``,
            ``limit_all_gathers``, …).
    """

    def __init__(
        self,
        sharding_strategy: str = "FULL_SHARD",
        state_dict_type: str = "full",
        checkpoint_blocks: bool = True,
        **kwargs: Any,
    ) -> None:
        # `is None`, not setdefault: LightningCLI passes every inherited argument, unset ones as None.
        if kwargs.get("auto_wrap_policy") is None:
            kwargs["auto_wrap_policy"] = fsdp_wrap_classes()
        if checkpoint_blocks and kwargs.get("activation_checkpointing_policy") is None:
            kwargs["activation_checkpointing_policy"] = block_classes()
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type, **kwargs)

    @property
    def mixed_precision_config(self) -> Any:
        """An explicit ``mixed_precision`` argument wins; bf16 precisions compute in bf16 and reduce in fp32."""
        if self.mixed_precision is None and self.precision_plugin.precision in ("bf16-mixed", "bf16-true"):
            from torch.distributed.fsdp import MixedPrecision

            return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
        return super().mixed_precision_config


def strategy_checkpoints_blocks(strategy: Strategy | None) -> bool:
    """Whether ``strategy`` applies its own activation checkpointing to the model's Blocks (an FSDP policy)."""
    return isinstance(strategy, FSDPStrategy) and bool(getattr(strategy, "_activation_checkpointing_kwargs", None))


def compile_under_ddp(strategy: Strategy | None) -> bool:
    """Before compiling Blocks under DDP: turn Dynamo's DDPOptimizer off; True if done.

    The DDPOptimizer splits each compiled graph at DDP's bucket boundaries, and fails on graphs with activation
    checkpointing (the Blocks' ``recompute``: "Node ... was invalid, but is output", PyTorch issue 104674, seen on
    the GPU with torch 2.11); per-Block graphs need no splitting, DDP's buckets still overlap the backward pass.
    """
    if not isinstance(strategy, DDPStrategy):
        return False
    torch._dynamo.config.optimize_ddp = False
    return True


def hand_over_recompute(network: SparseTransformer, strategy: Strategy | None) -> bool:
    """Turn the Blocks' own recomputation off when the strategy checkpoints every Block; True if handed over.

    Both at once would recompute each branch twice in the backward pass (the strategy's whole-block checkpoint
    replays the block, whose branches are themselves checkpointed), so the strategy's policy is the one kept.
    """
    if not strategy_checkpoints_blocks(strategy):
        return False
    blocks = [b for b in network.modules() if isinstance(b, Block) and b.recompute]
    for block in blocks:
        block.recompute = False
    if blocks:
        log.info(
            "lightning-sparse: the strategy's activation_checkpointing_policy checkpoints every Block; the model's own "
            "recompute=True is turned off for %d blocks so nothing is recomputed twice.",
            len(blocks),
        )
    return bool(blocks)


def clip_sharded_grad_norm(strategy: Strategy, max_norm: float) -> bool:
    """Clip the global gradient norm through the FSDP root module (a plain ``clip_grad_norm_`` over local shards would
    be wrong); True if done, False if ``strategy`` is not FSDP (the caller clips normally)."""
    if not isinstance(strategy, FSDPStrategy):
        return False
    strategy.model.clip_grad_norm_(max_norm)  # the root FullyShardedDataParallel: a collective over all ranks
    return True


_NDIM_ATTRIBUTE = "_lightning_sparse_ndim"


def remember_ndims(network: nn.Module) -> None:
    """Record every parameter's number of dimensions as built, before any wrapping.

    FSDP1 (``use_orig_params=True``) keeps the parameter objects but turns each into a flat 1-D view of its local
    shard, so ``p.dim()`` no longer tells a weight matrix (weight decay) from a bias (none); :func:`built_ndim` reads
    the recorded value.
    """
    for p in network.parameters():
        setattr(p, _NDIM_ATTRIBUTE, p.dim())


def built_ndim(p: torch.Tensor) -> int:
    """A parameter's number of dimensions when the network was built (:func:`remember_ndims`), else ``p.dim()``."""
    return getattr(p, _NDIM_ATTRIBUTE, p.dim())


# ----- FSDP2: ModelParallelStrategy's device mesh -------------------------------------------------------------------


def mixed_precision_policy(precision: str) -> Any:
    """The FSDP2 ``MixedPrecisionPolicy`` for a Trainer precision: bf16 parameters with fp32 gradient reduction for
    "bf16-mixed"/"bf16-true", fp16/fp32 for "16-true", no casting for "32-true"."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision in ("bf16-mixed", "bf16-true"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "16-true":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    if precision == "32-true":
        return MixedPrecisionPolicy()
    raise ValueError(
        "FSDP2 (ModelParallelStrategy) supports precision 32-true, bf16-mixed, bf16-true or 16-true; "
        f"got {precision!r}."
    )


def is_sharded(network: nn.Module) -> bool:
    """Whether ``fully_shard`` has been applied to ``network``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(network, FSDPModule)


def shard_blocks(network: SparseTransformer, mesh: Any, mp_policy: Any) -> None:
    """``fully_shard`` every residual Block over the data-parallel mesh, then the root (embeddings, final norm, head).

    ``mesh`` is ModelParallelStrategy's device mesh (its "data_parallel" dimension is used; tensor parallelism is
    not implemented for this model) or a 1-D mesh. The last Block keeps its parameters gathered after the forward
    pass, since the backward pass needs them first. Idempotent: a network already sharded is left as it is.
    """
    from torch.distributed.fsdp import fully_shard

    if is_sharded(network):
        return
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() != 1:
        raise ValueError(
            f"lightning-sparse shards with FSDP2 only (no tensor parallelism): ModelParallelStrategy's "
            f"tensor_parallel_size is {mesh['tensor_parallel'].size()}; set trainer.strategy.init_args."
            "tensor_parallel_size: 1 and data_parallel_size to the number of processes."
        )
    dp_mesh = mesh["data_parallel"] if "data_parallel" in names and mesh.ndim > 1 else mesh  # a 1-D mesh is it
    blocks = [m for m in network.modules() if isinstance(m, tuple(block_classes()))]
    for i, block in enumerate(blocks):
        fully_shard(block, mesh=dp_mesh, mp_policy=mp_policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(network, mesh=dp_mesh, mp_policy=mp_policy)


# ----- Checkpoints -------------------------------------------------------------------------------------------------


def consolidate_checkpoint(folder: str | Path, output: str | Path | None = None) -> Path:
    """Merge a sharded checkpoint folder (FSDPStrategy ``state_dict_type="sharded"`` or ModelParallelStrategy's
    distributed checkpoint) into one Lightning ``.ckpt`` file that any strategy, one device included, can read.

    Runs in one process without a GPU. ``output`` defaults to ``FOLDER.consolidated.ckpt`` next to the folder; an
    existing file is never overwritten. Returns the path written.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME, _load_distributed_checkpoint

    import lightning_sparse.modules  # noqa: F401 - lets torch.load(weights_only=True) rebuild patterns in hparams

    folder = Path(folder)
    if not (folder.is_dir() and (folder / _METADATA_FILENAME).is_file()):
        raise ValueError(
            f"{folder} is not a sharded Lightning checkpoint: expected a folder with the shards and a "
            f"{_METADATA_FILENAME} file (written by FSDPStrategy(state_dict_type='sharded') or ModelParallelStrategy)."
        )
    output = Path(output) if output is not None else folder.with_name(folder.name + ".consolidated.ckpt")
    if output.exists():
        raise FileExistsError(f"{output} exists; choose another output path or remove it first.")
    checkpoint = _load_distributed_checkpoint(folder)
    # FSDPStrategy stores the weights under "model", ModelParallelStrategy under "state_dict".
    if "model" in checkpoint and "state_dict" not in checkpoint:
        checkpoint["state_dict"] = checkpoint.pop("model")
    optimizer_keys = sorted((k for k in checkpoint if re.fullmatch(r"optimizer_\d+", k)), key=lambda k: int(k[10:]))
    if optimizer_keys:
        checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizer_keys]
    with atomic_write(output) as f:
        torch.save(checkpoint, f)
    return output


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_sparse.parallel FOLDER [--output FILE]``: consolidate a sharded checkpoint."""
    parser = argparse.ArgumentParser(description=consolidate_checkpoint.__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="the sharded checkpoint folder (e.g. runs/NAME/version_0/checkpoints/last.ckpt)")
    parser.add_argument("--output", default=None, help="the .ckpt file to write (default FOLDER.consolidated.ckpt)")
    args = parser.parse_args(argv)
    print(consolidate_checkpoint(args.folder, args.output))


if __name__ == "__main__":
    main()
