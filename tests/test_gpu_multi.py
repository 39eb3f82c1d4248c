"""Two GPUs: DDP, FSDP (SparseFSDPStrategy) and FSDP2 (ModelParallelStrategy) in bf16, against one GPU.

Run on a machine with 2 CUDA devices: ``python -m pytest -m gpu tests/test_gpu_multi.py -v``. Every run is
tests/parallel_run.py (the triton attention backend, bf16-mixed, gradient clipping 1.0, sampling after each
validation so sharded forwards outside the training step are exercised), started as a script so Lightning's launcher
can start the second process.

* 20 training steps on 2 GPUs at batch 4 each give the losses of 1 GPU at batch 8 within bf16 tolerance;
* validation bits/dim of the checkpoint a 2-GPU run saved, read back on one GPU (sharded checkpoints consolidated
  first), equal the 2-GPU value;
* a sharded run resumes on 2 GPUs with the losses of the uninterrupted run;
* FSDP: SHARD_GRAD_OP and HYBRID_SHARD train like FULL_SHARD; the model's recompute=True is handed over to the
  strategy's per-Block activation checkpointing; the weight-decay groups are those of one GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_sparse import parallel

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]

RUN = Path(__file__).with_name("parallel_run.py")
BF16 = {"rel": 1e-2}  # bf16 compute: different batch splits round differently (one GPU vs two)
GPU = ("--accelerator", "gpu", "--precision", "bf16-mixed", "--sample")


def run(tmp: Path, name: str, *args: str) -> dict:
    out = tmp / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(RUN), *GPU, *args, "--out", str(out)], cwd=tmp, capture_output=True, text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(out.read_text())


def two_gpus(strategy: str, *args: str) -> tuple[str, ...]:
    return ("--strategy", strategy, "--devices", "2", "--batch", "4", *args)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_multi")
    steps = ("--steps", "20")
    return {
        "tmp": tmp,
        "single": run(tmp, "single", "--devices", "1", "--batch", "8", *steps),
        "ddp": run(tmp, "ddp", *two_gpus("ddp", *steps, "--ckpt-dir", str(tmp / "ddp_ckpt"))),
        # --recompute: the model asks for its own recomputation, the strategy's policy must take it over
        "fsdp": run(tmp, "fsdp", *two_gpus("fsdp", *steps, "--recompute", "--ckpt-dir", str(tmp / "fsdp_ckpt"))),
        "fsdp2": run(tmp, "fsdp2", *two_gpus("fsdp2", *steps, "--recompute", "--ckpt-dir", str(tmp / "fsdp2_ckpt"))),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2"])
def test_two_gpus_train_like_one_at_twice_the_batch(runs, strategy):
    single, multi = runs["single"], runs[strategy]
    assert multi["world_size"] == 2 and len(multi["losses"]) == len(single["losses"]) == 20
    assert single["losses"][-1] < single["losses"][0] - 0.3  # it trained
    assert multi["losses"] == pytest.approx(single["losses"], **BF16)
    assert multi["val_bpd"] == pytest.approx(single["val_bpd"], **BF16)
    assert multi["decay_params"] == single["decay_params"] == 12
    if strategy == "fsdp":
        assert multi["fsdp1_units"] >= 3  # the network and both Blocks are FSDP units
        assert multi["blocks_recompute"] == [False, False]  # handed over to the strategy's checkpointing
    if strategy == "fsdp2":
        assert multi["fsdp2_sharded"] and multi["blocks_recompute"] == [True, True]  # FSDP2 keeps the model's own


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp2"])
def test_checkpoint_of_two_gpus_validates_on_one_to_the_same_bpd(runs, strategy):
    checkpoint = runs["tmp"] / f"{strategy}_ckpt" / "step=20.ckpt"
    if checkpoint.is_dir():  # FSDP (state_dict_type="sharded") and FSDP2 write folders
        checkpoint = parallel.consolidate_checkpoint(checkpoint)
    assert strategy == "ddp" or checkpoint.name.endswith(".consolidated.ckpt")
    single = run(runs["tmp"], f"validate_{strategy}", "--devices", "1", "--batch", "8", "--validate", str(checkpoint))
    assert single["val_bpd"] == pytest.approx(runs[strategy]["val_bpd"], rel=5e-3)  # bf16: batch 8 vs 4 kernels


@pytest.mark.parametrize("strategy", ["fsdp", "fsdp2"])
def test_sharded_run_resumes_on_two_gpus(runs, strategy):
    folder = runs["tmp"] / f"{strategy}_ckpt" / "step=10.ckpt"
    assert folder.is_dir()
    resumed = run(runs["tmp"], f"resumed_{strategy}", *two_gpus(strategy, "--steps", "20", "--resume", str(folder)))
    assert resumed["global_step"] == 20 and len(resumed["losses"]) == 10
    assert resumed["losses"] == pytest.approx(runs[strategy]["losses"][10:], rel=2e-3)


@pytest.mark.parametrize("sharding", ["SHARD_GRAD_OP", "HYBRID_SHARD"])
def test_fsdp_sharding_strategies_train_like_one_gpu(runs, sharding):
    multi = run(runs["tmp"], f"fsdp_{sharding}", *two_gpus("fsdp", "--steps", "20", "--sharding", sharding))
    assert multi["losses"] == pytest.approx(runs["single"]["losses"], **BF16)
