"""Checkpoints are atomic (a save killed with SIGKILL never leaves a broken ``.ckpt``), ``last.ckpt`` is written at
every stop, and a resumed run keeps its learning rate and gets its own ``max_time``."""

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from test_cli import scalars, tiny_config
from torch.utils.data import DataLoader

from lightning_sparse.callbacks import LastCheckpointOnStop, TimeLimitPerRun
from lightning_sparse.checkpoint_io import AtomicCheckpointIO, remove_orphaned_temporaries
from lightning_sparse.cli import build_cli, cli_main
from lightning_sparse.kernels import Fixed
from lightning_sparse.modules import WarmupCosine
from lightning_sparse.text import TextDensityModel

ROOT = Path(__file__).resolve().parents[1]

# A child process trains a tiny model, saving last.ckpt after every validation; the chosen save of last.ckpt writes
# half its bytes into the temporary file, signals the test through an event file and waits to be killed.
CHILD = textwrap.dedent(
    """
    import io, os, sys, time
    import lightning as L, torch
    from torch.utils.data import DataLoader
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_sparse import checkpoint_io
    from lightning_sparse.checkpoint_io import AtomicCheckpointIO
    from lightning_sparse.kernels import Fixed
    from lightning_sparse.text import TextDensityModel

    run, event, block_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    real_save = torch.save

    class BlockingCheckpointIO(AtomicCheckpointIO):
        saves_of_last = 0

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if os.path.basename(path) == "last.ckpt":
                self.saves_of_last += 1
                if self.saves_of_last == block_at:
                    def half_then_block(obj, f):
                        buffer = io.BytesIO()
                        real_save(obj, buffer)
                        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                        f.flush()
                        open(event, "w").close()
                        time.sleep(600)
                    checkpoint_io.torch.save = half_then_block  # the torch.save that AtomicCheckpointIO calls
            super().save_checkpoint(checkpoint, path, storage_options)

    L.seed_everything(0)
    text = torch.tensor(list(b"def f(x):\\n    return x + 1\\n" * 40), dtype=torch.uint8)
    windows = [text[i : i + 17].clone() for i in range(0, 640, 10)]
    model = TextDensityModel(seq_len=16, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), lr=1e-2,
                             warmup_steps=2)
    checkpoint = ModelCheckpoint(dirpath=os.path.join(run, "checkpoints"), monitor="val/bpd", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=40, val_check_interval=2, limit_val_batches=1, logger=False,
                        callbacks=[checkpoint], plugins=[BlockingCheckpointIO()], enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(windows, batch_size=4), DataLoader(windows[:4], batch_size=4))
    """
)


def test_checkpoint_save_killed_with_sigkill_leaves_only_loadable_checkpoints(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem than the test's folder")
    run, event = tmp_path / "run", tmp_path / "blocked"
    with tempfile.TemporaryDirectory(dir=shm) as tmpdir:
        env = {**os.environ, "TMPDIR": tmpdir}
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(run), str(event), "3"], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        while not event.exists():
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never reached the blocking save"
            time.sleep(0.1)
        os.kill(child.pid, signal.SIGKILL)  # in the middle of writing the third last.ckpt
        child.wait()
        assert child.returncode == -signal.SIGKILL
        assert list(Path(tmpdir).iterdir()) == []  # nothing went through $TMPDIR

    folder = run / "checkpoints"
    finals = sorted(folder.glob("*.ckpt"))
    assert folder / "last.ckpt" in finals and len(finals) >= 2
    for path in finals:  # each final name holds a complete checkpoint
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["global_step"] > 0 and state["state_dict"]
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 4  # the second save, intact
    orphans = [p.name for p in folder.iterdir() if p.suffix != ".ckpt"]
    assert len(orphans) == 1 and orphans[0].startswith(".last.ckpt.") and orphans[0].endswith(".tmp")

    # Lightning's "last" lookup ignores the hidden temporary; the next save of last.ckpt removes it.
    trainer = L.Trainer(logger=False, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=folder)])
    assert trainer.checkpoint_callback._find_last_checkpoints(trainer) == {str(folder / "last.ckpt")}
    AtomicCheckpointIO().save_checkpoint({"global_step": 5}, folder / "last.ckpt")
    assert sorted(p.name for p in folder.iterdir() if p.suffix != ".ckpt") == []
    assert torch.load(folder / "last.ckpt", weights_only=True) == {"global_step": 5}


def test_atomic_save_replaces_the_file_and_cleans_only_its_own_orphans(tmp_path):
    target = tmp_path / "a.ckpt"
    (tmp_path / ".a.ckpt.x1.tmp").write_bytes(b"half")  # a killed write of a.ckpt
    (tmp_path / ".b.ckpt.x2.tmp").write_bytes(b"half")  # of another checkpoint: not ours to remove
    AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b.ckpt.x2.tmp", "a.ckpt"]
    AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(3)}, f"file://{target}")
    assert torch.equal(torch.load(target, weights_only=True)["w"], torch.zeros(3))
    assert remove_orphaned_temporaries(tmp_path / "b.ckpt") == [tmp_path / ".b.ckpt.x2.tmp"]
    with pytest.raises(TypeError, match="storage_options"):
        AtomicCheckpointIO().save_checkpoint({}, target, storage_options={"x": 1})


def test_modules_and_cli_install_the_atomic_checkpoint_io(tmp_path):
    model = TextDensityModel(seq_len=16, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), warmup_steps=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    text = torch.randint(0, 256, (4, 17), dtype=torch.uint8)
    trainer.fit(model, DataLoader(list(text), batch_size=4))
    assert type(trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # installed by the module's callbacks
    cli = build_cli(["--config", str(tiny_config(tmp_path))], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO  # the CLI's default plugin


def _resume_config(tmp_path: Path) -> Path:
    """The tiny CLI config, 30 steps with validation every 20 (the issue's case), 400 windows per epoch."""
    config = yaml.safe_load(
        tiny_config(tmp_path, name="resume", max_steps=30, val_check_interval=20, check_val_every_n_epoch=None,
                    limit_val_batches=2, max_time="00:00:30:00").read_text()
    )
    config["data"]["init_args"]["train_samples"] = 400
    config["model"]["init_args"].update(warmup_steps=5)
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_fit_saves_last_at_the_stop_and_a_longer_resume_keeps_learning(tmp_path, caplog):
    config = _resume_config(tmp_path)
    cli_main(["fit", "--config", str(config)])
    run = tmp_path / "runs" / "resume" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, weights_only=True)
    assert state["global_step"] == 30  # not 20, the step of the last validation
    # Pretend the first run used up far more than max_time: the resumed run must still train (its own time limit).
    state["callbacks"]["Timer"]["time_elapsed"]["train"] = 10 * 3600.0
    torch.save(state, last)

    with caplog.at_level("INFO"):
        cli_main(["fit", "--config", str(config), "--trainer.max_steps", "60", "--ckpt_path", str(last)])
    assert "schedule now spans 60 optimizer steps (5 warmup), the checkpoint's spanned 30" in caplog.text
    assert "the checkpoint had trained for 10:00:00" in caplog.text
    assert torch.load(last, weights_only=True)["global_step"] == 60
    assert not (tmp_path / "runs" / "resume" / "version_1").exists()  # the resume logs into its run
    lrs = dict(scalars(run, "lr-AdamW/pg1"))
    assert max(lrs) == 59 and all(lr > 0 for step, lr in lrs.items() if step >= 30)
    schedule = WarmupCosine(5, 60)  # the 60-step schedule from step 30 on, as if the run had been 60 steps long
    for step in range(30, 60):
        assert lrs[step] == pytest.approx(3e-3 * schedule(step), rel=1e-6)


def test_last_checkpoint_is_written_on_ctrl_c_but_not_twice_at_one_step(tmp_path):
    class CtrlCAt(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == 3:
                raise KeyboardInterrupt

    saves = []

    class CountingIO(AtomicCheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            saves.append((Path(path).name, checkpoint["global_step"]))
            super().save_checkpoint(checkpoint, path, storage_options)

    def fit(max_steps, folder, *callbacks):
        model = TextDensityModel(seq_len=16, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), warmup_steps=0)
        checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=folder, monitor="val/bpd", save_last=True)
        trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, val_check_interval=2, limit_val_batches=1,
                            logger=False, callbacks=[checkpoint, *callbacks], plugins=[CountingIO()],
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        text = torch.randint(0, 256, (40, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        trainer.fit(model, DataLoader(list(text), batch_size=4), DataLoader(list(text[:4]), batch_size=4))
        return trainer

    with pytest.raises(SystemExit):  # Lightning's graceful Ctrl-C handling ends with exit(1)
        fit(10, tmp_path / "a", CtrlCAt())
    assert ("last.ckpt", 3) in saves and torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)["global_step"] == 3
    saves.clear()
    trainer = fit(4, tmp_path / "b")  # ends at a validation step: last.ckpt of step 4 is written once
    assert [s for s in saves if s[0] == "last.ckpt"] == [("last.ckpt", 2), ("last.ckpt", 4)]
    assert any(isinstance(c, LastCheckpointOnStop) for c in trainer.callbacks)
    assert any(isinstance(c, TimeLimitPerRun) for c in trainer.callbacks)


def test_max_time_stop_leaves_room_for_the_final_validation(tmp_path, caplog):
    class SlowValidationSeen(L.Callback):
        """After the first validation, pretend it took longer than the time left of max_time."""

        def on_train_batch_start(self, trainer, *args):
            limit = next(c for c in trainer.callbacks if isinstance(c, TimeLimitPerRun))
            if limit.last_validation_seconds:
                limit.last_validation_seconds = 3600.0

    validated = []

    class Validations(L.Callback):
        def on_validation_end(self, trainer, *args):
            validated.append(trainer.global_step)

    model = TextDensityModel(seq_len=16, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), warmup_steps=0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/bpd", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_steps=20, max_time="00:00:30:00", val_check_interval=2,
                        limit_val_batches=1, logger=False, callbacks=[SlowValidationSeen(), Validations(), checkpoint],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    text = torch.randint(0, 256, (80, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with caplog.at_level("INFO"):
        trainer.fit(model, DataLoader(list(text), batch_size=4), DataLoader(list(text[:4]), batch_size=4))
    assert trainer.global_step == 3 and validated == [2, 3]  # stopped one step later, then the final validation ran
    assert "final validation takes about 3600 s" in caplog.text
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3


def test_cli_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    def config(name: str) -> Path:
        path = tiny_config(tmp_path, name=name, max_steps=10, val_check_interval=5, check_val_every_n_epoch=None,
                           limit_val_batches=2)
        values = yaml.safe_load(path.read_text())
        values["data"]["init_args"]["train_samples"] = 16  # epochs of 4 steps: the resumed part crosses two
        # A fixed schedule length, so the interrupted run (max_steps=3) trains its steps at the full run's rates.
        values["model"]["init_args"].update(decay_steps=10)
        path.write_text(yaml.safe_dump(values))
        return path

    cli_main(["fit", "--config", str(config("whole"))])
    cut = config("cut")
    cli_main(["fit", "--config", str(cut), "--trainer.max_steps=3"])  # stops mid-epoch, between validations
    last = tmp_path / "runs" / "cut" / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    cli_main(["fit", "--config", str(cut), "--ckpt_path", str(last)])

    whole, resumed = tmp_path / "runs" / "whole" / "version_0", tmp_path / "runs" / "cut" / "version_0"
    assert dict(scalars(resumed, "train/loss")) == dict(scalars(whole, "train/loss"))  # all 10 steps, bit for bit
    assert len(scalars(whole, "train/loss")) == 10
    assert scalars(resumed, "val/bpd") == scalars(whole, "val/bpd") and len(scalars(whole, "val/bpd")) == 2


def test_a_max_epochs_stop_between_validations_writes_last_at_the_final_step(tmp_path):
    """10 batches, one epoch, validation every 4 steps: without the stop callback last.ckpt would hold step 8."""
    model = TextDensityModel(seq_len=16, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), warmup_steps=0)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path, monitor="val/bpd", save_last=True)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, val_check_interval=4, limit_val_batches=1, logger=False,
                        callbacks=[checkpoint], enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0)
    text = torch.randint(0, 256, (40, 17), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    trainer.fit(model, DataLoader(list(text), batch_size=4), DataLoader(list(text[:4]), batch_size=4))
    assert trainer.global_step == 10
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 10
