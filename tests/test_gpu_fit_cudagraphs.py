"""A whole ``lightning-sparse fit`` with CUDA graphs on one GPU (``pytest -m gpu tests/test_gpu_fit_cudagraphs.py``).

The Enwik8 and CIFAR-10 paper configs, shrunk on the command line (2 layers, 12 steps, small data in the release
formats: ``enwik8.zip`` and ``cifar-10-python.tar.gz`` with their checksums, no download) and run with
``--model.init_args.compile true --model.init_args.compile_mode reduce-overhead``: every residual block, the output
norm and head are compiled and replay CUDA graphs (cudagraph trees) in the training steps and in validation. Everything
else is the config's own: bf16-mixed, gradient clipping, dropout, recomputation, the ddp strategy (on one device),
attention_backend auto (triton on CUDA) and the config's sample callback, which samples after each validation with
the KV-cached sampler (compiled blocks forced eager, its own captured CUDA graph) while the compiled blocks' cudagraph
trees are alive. The Enwik8 validation set ends with a batch of 1 after a batch of 2, as the real one does, so the
compiled evaluation graphs also meet a second batch size.

Each case runs the console script as a subprocess (a fresh process: its own Dynamo caches and cudagraph pools) and
checks:

* ``fit`` exits 0; with Inductor's CUDA-graph logs on (``TORCH_LOGS=perf_hints,cudagraphs``) it recorded cudagraph
  trees and skipped none ("skipping cudagraph(s) due to ..."): the CUDA graphs were used, not silently dropped;
* ``train/loss`` and ``train/bpd`` are logged at every step and finite (``train/bpd`` starts at 8 bits, the
  zero-initialized head);
* validation ran three times, twice during training (steps 4 and 8) and at step 12, each with a finite
  ``val/bpd`` and followed by the config's sample (``samples/text`` or ``samples/images`` + ``samples/completions``);
* ``last.ckpt`` loads (``torch.load``) at step 12 with finite weights and the CUDA-graph compile mode;
* ``validate`` of ``last.ckpt`` under the same compile mode exits 0 and gives the ``val/bpd`` that the fit logged at
  step 12 (same weights, same data), and samples again.

:func:`check_fit_and_validate` is the whole body of a case; ``extra`` arguments are appended to both command lines
(e.g. ``--trainer.accelerator=cpu --trainer.strategy=auto --model.init_args.compile=false`` for a CPU smoke check of
the plumbing; ``expect_cudagraphs=False`` then).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import CIFAR_BATCHES, cifar_archive, enwik8_zip
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXE = Path(sys.executable).with_name("lightning-sparse")  # the installed console script: lightning_sparse.cli:cli_main

MAX_STEPS, VAL_EVERY = 12, 4
# Validations after training steps 4 and 8 (during training) and 12 (its end). Lightning logs the epoch-level val/bpd
# at the step of the last training log (3, 7, 11); the sample callbacks write at trainer.global_step (4, 8, 12).
VAL_STEPS, SAMPLE_STEPS = [3, 7, 11], [4, 8, 12]

# The same for both configs: one GPU, a short run validating every 4 steps on 2 batches, every step logged, CUDA graphs.
COMMON = [
    "--trainer.devices=1",
    f"--trainer.max_steps={MAX_STEPS}",
    f"--trainer.val_check_interval={VAL_EVERY}",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--model.init_args.n_layer=2",
    "--model.init_args.compile=true",
    "--model.init_args.compile_mode=reduce-overhead",
]
# The config's TextSampleLogger (prompt_length 64), with a 32-byte sample.
TEXT_SAMPLE = ('--trainer.callbacks=[{"class_path": "lightning_sparse.sample_logging.TextSampleLogger", '
               '"init_args": {"length": 32, "prompt_length": 64}}]')


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def enwik8_args(tmp: Path) -> list[str]:
    """enwik8.zip as released (one member `enwik8`), sized and checksummed; a 1,024-byte context, the config's
    Fixed(128, 32, summary_positions [0, 1, 2, 3]) pattern, 4 heads of width 64; 24 training crops (12 steps of 2)
    and 3 validation windows: a batch of 2, then a last batch of 1, as the real validation set ends (407 windows at
    batch 2), so the compiled evaluation graphs see a second batch size (a recompilation and a CUDA graph per size)."""
    folder = tmp / "data" / "enwik8"
    folder.mkdir(parents=True)
    data = np.random.default_rng(0).integers(9, 127, 16_384 + 3_072 + 2_048, dtype=np.uint8).tobytes()
    archive = enwik8_zip(data)
    (folder / "enwik8.zip").write_bytes(archive)
    return [
        f"--data.init_args.data_dir={folder}", "--data.init_args.download=false",
        f"--data.init_args.zip_size={len(archive)}", f"--data.init_args.zip_md5={_md5(archive)}",
        f"--data.init_args.size={len(data)}", f"--data.init_args.md5={_md5(data)}",
        "--data.init_args.seq_len=1024", "--data.init_args.batch_size=2", "--data.init_args.val_bytes=3072",
        "--data.init_args.test_bytes=2048", "--data.init_args.train_samples=24",
        "--model.init_args.d_model=256", "--model.init_args.n_head=4",
        TEXT_SAMPLE,
    ]


def cifar10_args(tmp: Path) -> list[str]:
    """cifar-10-python.tar.gz as released (Python 2 pickles), with the archive's and every batch's md5; 8 images per
    batch file: 36 training images, 4 held out for validation (2 batches of 2). The config's model widths (2 heads,
    d_model 256, half-size query/key: heads of width 64 and 128) and its ImageSampleLogger (4 samples, 4
    completions)."""
    folder = tmp / "data" / "cifar10"
    folder.mkdir(parents=True)
    archive, files, _, _ = cifar_archive(8, np.random.default_rng(0))
    (folder / "cifar-10-python.tar.gz").write_bytes(archive)
    file_md5s = {name: _md5(files[name]) for name in CIFAR_BATCHES}
    return [
        f"--data.init_args.data_dir={folder}", "--data.init_args.download=false",
        f"--data.init_args.md5={_md5(archive)}", f"--data.init_args.file_md5s={json.dumps(file_md5s)}",
        "--data.init_args.val_size=4", "--data.init_args.batch_size=2",
    ]


CASES = {
    "enwik8": (enwik8_args, {"samples/text/text_summary": "tensors"}),
    "cifar10": (cifar10_args, {"samples/images": "images", "samples/completions": "images"}),
}


def run_cli(args: Sequence[str], cwd: Path, timeout: float = 300) -> tuple[str, float]:
    """Run the console script; return its combined output and wall time. Inductor's CUDA-graph logs are on: each
    compiled graph run as CUDA graphs logs "recording cudagraph tree for ...", and one that Inductor does not run as
    CUDA graphs logs "skipping cudagraph(s) due to ..." (the ``cudagraphs`` artifact, ``perf_hints`` in older
    PyTorch)."""
    env = {**os.environ, "TORCH_LOGS": "perf_hints,cudagraphs", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    result = subprocess.run([str(EXE), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"exit status {result.returncode} of {' '.join(args[:3])}:\n{output[-6000:]}"
    return output, seconds


def check_cudagraphs(output: str) -> None:
    """Inductor recorded CUDA graphs and fell back to plain kernels for no graph."""
    lines = output.lower().splitlines()
    skipped = [line for line in lines if "skipping cudagraph" in line]
    assert not skipped, "\n".join(skipped[:20])
    assert any("recording cudagraph tree for" in line for line in lines), output[-6000:]


def read_events(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    assert tag in events.Tags()["scalars"], f"{tag} not logged; scalars: {events.Tags()['scalars']}"
    return [(e.step, e.value) for e in events.Scalars(tag)]


def check_samples(events: EventAccumulator, samples: dict[str, str], steps: list[int]) -> None:
    """Each sample tag was written once after each validation (at the listed steps), with real content."""
    for tag, kind in samples.items():
        assert tag in events.Tags()[kind], f"no {tag} in the event file; {kind}: {events.Tags()[kind]}"
        logged = events.Tensors(tag) if kind == "tensors" else events.Images(tag)
        assert [e.step for e in logged] == steps, (tag, [e.step for e in logged])
        for event in logged:
            if kind == "tensors":  # TextSampleLogger's Markdown: the prompt, then the 32 sampled bytes
                text = event.tensor_proto.string_val[0].decode()
                assert "**sample** (32 bytes" in text and "**prompt** (64 bytes)" in text, text
            else:  # 4 tiles of 32x32 per row, 2-pixel padding; completions: real images over their completions
                rows = 1 if tag == "samples/images" else 2
                assert (event.width, event.height) == (2 + 4 * 34, 2 + rows * 34), (tag, event.width, event.height)


def check_fit_and_validate(name: str, tmp: Path, extra: Sequence[str] = (), expect_cudagraphs: bool = True,
                           timeout: float = 300) -> dict[str, float]:
    """``fit`` the shrunk config ``name``, then ``validate`` its ``last.ckpt``; assert everything listed in the module
    docstring. ``extra`` is appended to both command lines. Returns the wall time of each command."""
    make_args, samples = CASES[name]
    args = ["--config", str(CONFIGS / f"{name}.yaml"), *COMMON, *make_args(tmp), *extra]
    fit_output, fit_seconds = run_cli(["fit", *args], cwd=tmp, timeout=timeout)
    if expect_cudagraphs:
        check_cudagraphs(fit_output)
    log_dir = tmp / "runs" / name / "version_0"
    events = read_events(log_dir)

    # training: a finite loss at every step; the zero-initialized head predicts 8 bits at the first
    losses = scalars(events, "train/loss")
    assert [step for step, _ in losses] == list(range(MAX_STEPS)), losses
    assert all(math.isfinite(value) and value > 0 for _, value in losses), losses
    bpd = scalars(events, "train/bpd")
    assert [step for step, _ in bpd] == list(range(MAX_STEPS)), bpd
    assert all(math.isfinite(value) for _, value in bpd) and bpd[0][1] == pytest.approx(8.0, abs=1e-2), bpd

    # validation: twice during training and at its end, each finite, each followed by a sample
    val = scalars(events, "val/bpd")
    assert [step for step, _ in val] == VAL_STEPS, val
    assert all(math.isfinite(value) and 0 < value < 16 for _, value in val), val
    check_samples(events, samples, SAMPLE_STEPS)

    # the last checkpoint: the end of the run, finite weights, saved with the CUDA-graph compile mode
    last = log_dir / "checkpoints" / "last.ckpt"
    assert last.is_file(), sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == MAX_STEPS
    assert checkpoint["hyper_parameters"]["compile_mode"] == "reduce-overhead"
    weights = checkpoint["state_dict"]
    assert weights and all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())

    # validate the checkpoint under the same compile mode: the val/bpd of the fit's last validation (same weights)
    validate_output, validate_seconds = run_cli(["validate", *args, f"--ckpt_path={last}"], cwd=tmp, timeout=timeout)
    if expect_cudagraphs:
        check_cudagraphs(validate_output)
    validated = read_events(log_dir / "validate")  # validate logs beside the run that wrote the checkpoint
    ((_, reloaded),) = scalars(validated, "val/bpd")
    assert math.isfinite(reloaded) and reloaded == pytest.approx(val[-1][1], rel=1e-2), (reloaded, val)
    for tag, kind in samples.items():
        assert tag in validated.Tags()[kind], f"validate wrote no {tag}"
    print(f"{name}: fit {fit_seconds:.1f} s, validate {validate_seconds:.1f} s; val/bpd {val}, validate {reloaded}")
    return {"fit": fit_seconds, "validate": validate_seconds}


@pytest.mark.parametrize("name", sorted(CASES))
def test_fit_and_validate_with_cuda_graphs(name, tmp_path):
    check_fit_and_validate(name, tmp_path)
