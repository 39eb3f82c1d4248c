"""Sharded and data-parallel training on CPU (gloo): lightning_sparse.parallel and DensityModel.configure_model.

Two-process runs (tests/parallel_run.py, started as a script so Lightning's launcher can start the second process):
DDP and FSDP2 (ModelParallelStrategy, fully_shard per Block) train 4 steps with the losses of one process at twice
the batch, FSDP2's sharded checkpoint folder consolidates into a file that one process validates to the same
bits/dim, and a sharded run resumes on two processes with the losses of the uninterrupted run. fp32, so the
comparisons are tight (summation order only).

FSDP1 (Lightning's FSDPStrategy / SparseFSDPStrategy) cannot train on CPU: torch's FullyShardedDataParallel raises
"FSDP needs a non-CPU accelerator device" (torch 2.14). Its configuration (wrap and checkpointing policies, mixed
precision, sharding strategies, YAML through the CLI, the recompute hand-over, norm clipping through the FSDP root)
is tested here without training; training under it is in tests/test_gpu_multi.py.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, SingleDeviceStrategy
from test_cli import print_config, scalars, tiny_config
from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from lightning_sparse import parallel
from lightning_sparse.cli import build_cli
from lightning_sparse.kernels import Fixed
from lightning_sparse.model import Block, SparseTransformer, SparseTransformerConfig, compile_blocks
from lightning_sparse.text import TextDensityModel

RUN = Path(__file__).with_name("parallel_run.py")


def run(tmp: Path, name: str, *args: str) -> dict:
    """Run tests/parallel_run.py in ``tmp``; return rank 0's record."""
    out = tmp / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(RUN), *args, "--out", str(out)], cwd=tmp, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """One process at batch 8, DDP and FSDP2 on two processes at batch 4 each (FSDP2 saving sharded checkpoints);
    all sample 8 bytes after each validation (under FSDP2 a forward of the sharded network on every rank)."""
    tmp = tmp_path_factory.mktemp("parallel")
    two = ("--devices", "2", "--batch", "4", "--sample")
    return {
        "tmp": tmp,
        "single": run(tmp, "single", "--batch", "8", "--sample"),
        "ddp": run(tmp, "ddp", "--strategy", "ddp", *two),
        "fsdp2": run(tmp, "fsdp2", "--strategy", "fsdp2", *two, "--ckpt-dir", str(tmp / "fsdp2_ckpt")),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_like_one_at_twice_the_batch(runs, strategy):
    single, multi = runs["single"], runs[strategy]
    assert multi["world_size"] == 2 and single["world_size"] == 1
    assert multi["fsdp2_sharded"] is (strategy == "fsdp2")  # FSDP2 really sharded the network
    assert len(multi["losses"]) == len(single["losses"]) == 4
    assert single["losses"][-1] < single["losses"][0] - 0.1  # it trained: the comparison is not of constants
    assert multi["losses"] == pytest.approx(single["losses"], rel=1e-5)  # clipping (active) included
    assert multi["val_bpd"] == pytest.approx(single["val_bpd"], rel=1e-6)
    assert multi["decay_params"] == single["decay_params"] == 12  # 2-D weights of 2 blocks, embeddings, head


def test_fsdp2_sharded_checkpoint_consolidates_and_validates_on_one_process(runs):
    tmp, folder = runs["tmp"], runs["tmp"] / "fsdp2_ckpt" / "step=4.ckpt"
    assert folder.is_dir()
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= {p.name for p in folder.iterdir()}
    consolidated = parallel.consolidate_checkpoint(folder)
    assert consolidated == folder.with_name("step=4.ckpt.consolidated.ckpt")
    checkpoint = torch.load(consolidated, weights_only=True)
    assert "model.blocks.0.attn.qkv.weight" in checkpoint["state_dict"]  # plain keys, full tensors
    assert checkpoint["state_dict"]["model.blocks.0.attn.qkv.weight"].shape == (192, 64)
    assert len(checkpoint["optimizer_states"]) == 1 and checkpoint["global_step"] == 4
    single = run(tmp, "validate", "--validate", str(consolidated))
    assert single["world_size"] == 1
    assert single["val_bpd"] == pytest.approx(runs["fsdp2"]["val_bpd"], rel=1e-6)
    with pytest.raises(FileExistsError, match="exists"):
        parallel.consolidate_checkpoint(folder)  # never overwrites
    with pytest.raises(ValueError, match="not a sharded Lightning checkpoint"):
        parallel.consolidate_checkpoint(consolidated)


def test_fsdp2_resumes_from_a_sharded_checkpoint_with_the_uninterrupted_losses(runs):
    # Resumed at the end of epoch 0 (step 2), with the model's own recomputation on: recomputing in fp32 changes
    # nothing numerically, so the last two losses must be those of the run that was not interrupted.
    folder = runs["tmp"] / "fsdp2_ckpt" / "step=2.ckpt"
    two = ("--strategy", "fsdp2", "--devices", "2", "--batch", "4", "--recompute")
    resumed = run(runs["tmp"], "resumed", *two, "--resume", str(folder))
    assert resumed["global_step"] == 4 and resumed["blocks_recompute"] == [True, True]
    assert resumed["losses"] == pytest.approx(runs["fsdp2"]["losses"][2:], rel=1e-6)


def test_fsdp2_fit_through_the_cli_and_validate_the_consolidated_checkpoint(tmp_path):
    """The YAML path: ModelParallelStrategy from the command line, then `validate` of the consolidated folder."""
    config = tiny_config(tmp_path, name="fsdp2")
    exe = Path(sys.executable).with_name("lightning-sparse")
    strategy = ["--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy"]
    strategy += ["--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1"]
    fit = [str(exe), "fit", "--config", str(config), "--trainer.devices", "2", *strategy]
    fit += ["--data.init_args.train_samples", "48"]  # 6 steps of 4 per rank: one epoch, one validation
    result = subprocess.run(fit, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    log_dir = tmp_path / "runs" / "fsdp2" / "version_0"
    ((_, fsdp2_bpd),) = scalars(log_dir, "val/bpd")
    consolidated = parallel.consolidate_checkpoint(log_dir / "checkpoints" / "last.ckpt")
    validate = [str(exe), "validate", "--config", str(config), "--ckpt_path", str(consolidated)]
    result = subprocess.run(validate, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    ((_, single_bpd),) = scalars(log_dir / "validate", "val/bpd")  # validate logs beside the checkpoint's run
    assert 0 < fsdp2_bpd < 8.0
    assert single_bpd == pytest.approx(fsdp2_bpd, rel=1e-6)


# ----- without processes: configuration, policies, hand-over --------------------------------------------------------


def tiny_network(recompute: bool) -> SparseTransformer:
    return SparseTransformer(
        SparseTransformerConfig(seq_len=16, n_layer=2, n_head=2, d_model=16, pattern=Fixed(4, 1), recompute=recompute)
    )


def test_sparse_fsdp_strategy_wraps_and_checkpoints_blocks():
    strategy = parallel.SparseFSDPStrategy()
    wrap = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(wrap, ModuleWrapPolicy) and set(wrap._module_classes) == {Block, SparseTransformer}
    checkpointing = strategy._activation_checkpointing_kwargs["auto_wrap_policy"]
    assert set(checkpointing._module_classes) == {Block}
    assert strategy.kwargs["use_orig_params"] is True  # needed by torch.compile and by per-parameter groups
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert parallel.SparseFSDPStrategy(checkpoint_blocks=False)._activation_checkpointing_kwargs == {}
    for name in ("SHARD_GRAD_OP", "HYBRID_SHARD", "NO_SHARD"):
        assert parallel.SparseFSDPStrategy(sharding_strategy=name).sharding_strategy == ShardingStrategy[name]


def test_sparse_fsdp_strategy_reduces_gradients_in_fp32_under_bf16():
    from lightning.pytorch.plugins.precision import FSDPPrecision

    strategy = parallel.SparseFSDPStrategy()
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    mp = strategy.mixed_precision_config
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == (torch.bfloat16, torch.float32, torch.bfloat16)
    strategy.precision_plugin = FSDPPrecision("32-true")
    assert strategy.mixed_precision_config.reduce_dtype == torch.float32
    assert strategy.mixed_precision_config.param_dtype == torch.float32
    explicit = MixedPrecision(param_dtype=torch.float16)
    strategy = parallel.SparseFSDPStrategy(mixed_precision=explicit)
    strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    assert strategy.mixed_precision_config is explicit  # an explicit argument wins


def test_fsdp2_mixed_precision_policy_follows_the_trainer_precision():
    bf16 = parallel.mixed_precision_policy("bf16-mixed")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert parallel.mixed_precision_policy("bf16-true").reduce_dtype == torch.float32
    assert parallel.mixed_precision_policy("32-true").param_dtype is None  # no casting
    with pytest.raises(ValueError, match="16-mixed"):
        parallel.mixed_precision_policy("16-mixed")


def test_recompute_is_handed_over_to_the_strategy_policy_once(caplog):
    network = tiny_network(recompute=True)
    assert not parallel.hand_over_recompute(network, DDPStrategy())  # DDP: the model keeps its own recomputation
    assert not parallel.hand_over_recompute(network, parallel.SparseFSDPStrategy(checkpoint_blocks=False))
    assert all(b.recompute for b in network.blocks)
    with caplog.at_level(logging.INFO, logger="lightning_sparse.parallel"):
        assert parallel.hand_over_recompute(network, parallel.SparseFSDPStrategy())
    assert not any(b.recompute for b in network.blocks)
    assert "recompute=True is turned off for 2 blocks" in caplog.text
    assert not parallel.hand_over_recompute(network, parallel.SparseFSDPStrategy())  # nothing left to hand over


def test_plain_fsdp_strategy_from_yaml_hands_over_recompute(tmp_path, capsys):
    """Lightning's own FSDPStrategy written in YAML as the README shows it: it parses through the CLI, and the
    instantiated strategy makes configure_model turn the blocks' recomputation off."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = {
        "class_path": "lightning.pytorch.strategies.FSDPStrategy",
        "init_args": {
            "auto_wrap_policy": ["lightning_sparse.model.Block", "lightning_sparse.model.SparseTransformer"],
            "activation_checkpointing_policy": ["lightning_sparse.model.Block"],
            "sharding_strategy": "SHARD_GRAD_OP",
            "state_dict_type": "sharded",
        },
    }
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["trainer"].update(accelerator="gpu", devices=2, strategy=strategy)
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    printed = yaml.safe_load(print_config(["fit", "--config", str(path)], capsys))
    assert printed["trainer"]["strategy"]["init_args"]["sharding_strategy"] == "SHARD_GRAD_OP"
    # The Trainer refuses FSDPStrategy without a GPU, so instantiate the strategy alone, as the CLI would.
    parser = ArgumentParser()
    parser.add_argument("--strategy", type=FSDPStrategy)
    fsdp = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
    assert set(fsdp.kwargs["auto_wrap_policy"]._module_classes) == {Block, SparseTransformer}
    assert fsdp.sharding_strategy == ShardingStrategy.SHARD_GRAD_OP
    model = TextDensityModel(seq_len=16, n_layer=2, n_head=2, d_model=16, pattern=Fixed(4, 1), recompute=True)
    model._trainer = type("FakeTrainer", (), {"strategy": fsdp})()  # what configure_model reads of the Trainer
    model.configure_model()
    assert not any(b.recompute for b in model.model.blocks)


def test_sparse_fsdp_strategy_from_yaml_builds_a_cpu_trainer(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["trainer"]["strategy"] = {
        "class_path": "lightning_sparse.parallel.SparseFSDPStrategy",
        "init_args": {"sharding_strategy": "HYBRID_SHARD", "state_dict_type": "sharded"},
    }
    path = tmp_path / "fsdp.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path)], run=False)
    assert isinstance(cli.trainer.strategy, parallel.SparseFSDPStrategy)
    assert cli.trainer.strategy.sharding_strategy == ShardingStrategy.HYBRID_SHARD
    assert cli.trainer.strategy._state_dict_type == "sharded"


def test_norm_clipping_under_fsdp_goes_through_the_root_module():
    class Root(torch.nn.Module):
        clipped: list[float] = []

        def clip_grad_norm_(self, max_norm: float) -> None:
            self.clipped.append(max_norm)

    strategy = parallel.SparseFSDPStrategy()
    strategy.model = Root()
    assert parallel.clip_sharded_grad_norm(strategy, 1.0) and Root.clipped == [1.0]
    assert not parallel.clip_sharded_grad_norm(DDPStrategy(), 1.0)  # other strategies clip the usual way


def test_weight_decay_groups_survive_flattened_parameters():
    """FSDP1 turns parameters into flat 1-D shard views; the decay groups use the shapes recorded at build time."""
    model = TextDensityModel(
        seq_len=16, n_layer=2, n_head=2, d_model=16, pattern=Fixed(4, 1), warmup_steps=2, decay_steps=100
    )
    model.configure_model()
    expected = [len(g["params"]) for g in model.configure_optimizers()["optimizer"].param_groups]
    for p in model.model.parameters():
        p.data = p.data.reshape(-1)  # what FSDP1's use_orig_params views look like
    flattened = [len(g["params"]) for g in model.configure_optimizers()["optimizer"].param_groups]
    assert flattened == expected and expected[0] > 0 and expected[1] > 0


def test_shard_blocks_refuses_tensor_parallelism():
    class Mesh:
        mesh_dim_names = ("data_parallel", "tensor_parallel")

        def __getitem__(self, name: str):
            return type("Sub", (), {"size": lambda self: 2})()

    with pytest.raises(ValueError, match="tensor_parallel_size: 1"):
        parallel.shard_blocks(tiny_network(recompute=False), Mesh(), parallel.mixed_precision_policy("32-true"))


def test_model_parallel_strategy_parses_from_yaml(tmp_path):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["trainer"]["strategy"] = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1, "save_distributed_checkpoint": True},
    }
    config["trainer"]["devices"] = 2
    path = tmp_path / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(config))
    strategy = build_cli(["--config", str(path)], run=False).trainer.strategy
    assert isinstance(strategy, ModelParallelStrategy) and strategy._data_parallel_size == 2


def test_compiled_blocks_under_ddp_turn_the_ddp_optimizer_off(tmp_path):
    """Dynamo's DDPOptimizer fails on the Blocks' recomputation (checkpointed graphs): a compiled model under DDP
    turns it off in configure_model; other strategies leave it alone."""
    saved = torch._dynamo.config.optimize_ddp
    try:
        torch._dynamo.config.optimize_ddp = True
        assert not parallel.compile_under_ddp(SingleDeviceStrategy("cpu"))
        assert torch._dynamo.config.optimize_ddp
        model = TextDensityModel(seq_len=32, n_layer=1, n_head=2, d_model=64, pattern=Fixed(8, 2), compile=True)
        model.trainer = L.Trainer(accelerator="cpu", devices=1, strategy="ddp", logger=False, default_root_dir=tmp_path)
        model.configure_model()
        assert torch._dynamo.config.optimize_ddp is False
        assert all(b._compiled_call_impl is not None for b in model.model.blocks)
    finally:
        torch._dynamo.config.optimize_ddp = saved


def test_compile_blocks_compiles_in_place_once():
    network = tiny_network(recompute=False)
    keys = list(network.state_dict())
    compile_blocks(network)
    compiled = [b._compiled_call_impl for b in network.blocks]
    assert all(c is not None for c in compiled)
    assert list(network.state_dict()) == keys  # in-place compile: no "_orig_mod." in checkpoints
    compile_blocks(network)
    assert [b._compiled_call_impl for b in network.blocks] == compiled  # idempotent


def test_multi_gpu_benchmark_builds_the_configs_networks_without_the_cli():
    """benchmarks/multi_gpu.py reads the YAML with PyYAML only (no jsonargparse on the GPU machine)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "multi_gpu.py"
    spec = importlib.util.spec_from_file_location("multi_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    expected = {"enwik8": 94.9e6, "imagenet64": 151.6e6, "audio_65k": 151.8e6}  # the README's parameter counts
    for name, params in expected.items():
        network = bench.build_network(bench.network_args(bench.read_config(name)), torch.device("meta"))
        assert network.num_parameters() == pytest.approx(params, rel=2e-3), name
    image = bench.build_network(bench.network_args(bench.read_config("imagenet64")), torch.device("meta")).config
    assert image.start_token and image.position_shape == (64, 64, 3)
    long = bench.network_args(bench.read_config("audio_65k"), seq_len=1 << 20)
    assert long["pattern"]["init_args"]["stride"] == 1024 and bench.stride_for(1 << 17) == 512
    assert bench.build_network(long, torch.device("meta")).config.position_shape == (1024, 1024)
