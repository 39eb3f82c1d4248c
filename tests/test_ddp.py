"""DDP on CPU: `fit` with strategy=ddp, 2 processes, computes the same validation bits/dim as one process.

Training itself differs between 2 processes and 1 (twice the global batch), so the comparison is on the same
weights: the DDP run validates at the end of its epoch and saves that checkpoint; a single-process `validate` of the
checkpoint over the same validation data must give the same `val/bpd`. Both values are read from TensorBoard.

Padding: ByteCorpusDataModule pads its evaluation windows to a multiple of the world size with windows that score
nothing (first_scored = seq_len), so the DistributedSampler never repeats a real window; the tiny corpus has 33
validation windows, so this run exercises that padding. The bits/dim metric sums nats and dims over both ranks, so the
result is exact up to float32 summation order inside each batch.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from test_cli import scalars, tiny_config


def run_cli(*args: str, cwd: Path) -> str:
    """Run the console script; return its stderr (where Lightning reports the processes it started)."""
    exe = Path(sys.executable).with_name("lightning-sparse")
    result = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stderr


def test_ddp_validation_bpd_equals_single_process(tmp_path):
    config = tiny_config(tmp_path, name="ddp")
    # 2 ranks × 24 samples × 6 steps of 4 per rank: validation runs once, at the end of the epoch (step 6).
    log = run_cli(
        "fit",
        "--config",
        str(config),
        "--trainer.strategy",
        "ddp",
        "--trainer.devices",
        "2",
        "--data.init_args.train_samples",
        "48",
        cwd=tmp_path,
    )
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # really two processes
    log_dir = tmp_path / "runs" / "ddp" / "version_0"
    ((_, ddp_bpd),) = scalars(log_dir, "val/bpd")
    # The config's TextSampleLogger sampled on both ranks after the validation; only rank 0 wrote, once.
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    assert [e.step for e in events.Tensors("samples/text/text_summary")] == [6]
    (checkpoint,) = [p for p in (log_dir / "checkpoints").iterdir() if p.name != "last.ckpt"]

    run_cli("validate", "--config", str(config), "--ckpt_path", str(checkpoint), cwd=tmp_path)
    ((_, single_bpd),) = scalars(log_dir / "validate", "val/bpd")  # validate logs beside the checkpoint's run
    assert 0 < ddp_bpd < 8.0  # trained: below the uniform 8 bits
    assert single_bpd == pytest.approx(ddp_bpd, rel=1e-6)
