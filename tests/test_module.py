"""DensityModel and TextDensityModel: batch forms, loss and bits/dim, optimizer and schedule, checkpoints, samples."""

import math
import os
import re
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from lightning_sparse.callbacks import DivergedError
from lightning_sparse.kernels import Fixed
from lightning_sparse.metrics import BitsPerDim
from lightning_sparse.model import START
from lightning_sparse.modules import DensityModel, WarmupCosine
from lightning_sparse.sample_logging import TextSampleLogger
from lightning_sparse.text import TextDensityModel, markdown_code_block

SEQ = 16


def make(cls=TextDensityModel, **overrides):
    kw = dict(
        seq_len=SEQ, n_layer=1, n_head=2, d_model=16, pattern=Fixed(4, 1), lr=1e-2, warmup_steps=2
    )
    kw.update(overrides)
    return cls(**kw)


def text_windows(count: int, length: int = SEQ + 1, seed: int = 0) -> list[torch.Tensor]:
    """Windows of a repetitive text, so a few steps of training visibly lower the loss."""
    g = torch.Generator().manual_seed(seed)
    text = torch.tensor(list(b"def f(x):\n    return x + 1\n" * 40), dtype=torch.uint8)
    starts = torch.randint(0, len(text) - length, (count,), generator=g)
    return [text[s : s + length].clone() for s in starts.tolist()]


def trainer(tmp_path, **overrides) -> L.Trainer:
    kw = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
    )
    kw.update(overrides)
    return L.Trainer(**kw)


# ---------------------------------------------------------------------------------------------------------------
# BitsPerDim
# ---------------------------------------------------------------------------------------------------------------


def test_bits_per_dim_is_total_nats_over_dims_over_ln2():
    nats = torch.rand(7, dtype=torch.float64) * 100
    dims = torch.randint(1, 50, (7,))
    metric = BitsPerDim()
    for n, d in zip(nats, dims, strict=True):
        metric.update(n, d)
    expected = nats.sum() / dims.sum() / math.log(2)
    torch.testing.assert_close(metric.compute(), expected, rtol=1e-15, atol=0)
    assert metric.nats.dtype == torch.float64 and metric.dims.dtype == torch.int64
    metric.reset()
    metric.update(torch.tensor(math.log(2) * 12.0), 4)
    assert metric.compute().item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="scalar sums"):
        metric.update(torch.ones(3), 3)


def _metric_worker(rank: int, world: int, port: int, out: str, chunks: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = BitsPerDim()
    for nats, dims in chunks[rank]:
        metric.update(torch.tensor(nats, dtype=torch.float64), dims)
    value = metric.compute()  # gathers both sum states from every rank
    torch.save(value, f"{out}.{rank}")
    dist.destroy_process_group()


def test_bits_per_dim_is_exact_across_processes(tmp_path):
    g = torch.Generator().manual_seed(0)
    chunks = [
        [(float(torch.rand(1, generator=g)) * 1e3, int(torch.randint(1, 999, (1,), generator=g))) for _ in range(n)]
        for n in (3, 1)
    ]  # unequal shares, as ranks of a real run may have
    single = BitsPerDim()
    for nats, dims in chunks[0] + chunks[1]:
        single.update(torch.tensor(nats, dtype=torch.float64), dims)
    port = 29500 + os.getpid() % 1000
    # fork: the workers need no fresh interpreter (spawn would re-import this module and Lightning in each).
    mp.start_processes(_metric_worker, args=(2, port, str(tmp_path / "bpd"), chunks), nprocs=2, start_method="fork")
    for rank in range(2):
        value = torch.load(tmp_path / f"bpd.{rank}")
        torch.testing.assert_close(value, single.compute(), rtol=1e-14, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# The three batch forms and the loss
# ---------------------------------------------------------------------------------------------------------------


def test_inputs_and_targets_of_the_three_batch_forms():
    x = torch.randint(0, 256, (2, SEQ + 1), dtype=torch.uint8)
    inputs, targets, scored = make()._inputs_and_targets(x)  # stream data
    assert torch.equal(inputs, x[:, :-1].long()) and torch.equal(targets, x[:, 1:].long()) and scored is None

    records = x[:, :SEQ]
    inputs, targets, scored = make(start_token=True)._inputs_and_targets(records)  # record data
    assert torch.equal(inputs[:, 0], torch.full((2,), START))
    assert torch.equal(inputs[:, 1:], records[:, :-1].long()) and torch.equal(targets, records.long())

    inputs, targets, scored = make()._inputs_and_targets((x, torch.tensor([3, SEQ])))  # tail-scored windows
    assert torch.equal(targets, x[:, 1:].long())
    assert scored[0].tolist() == [t >= 3 for t in range(SEQ)] and not scored[1].any()

    with pytest.raises(ValueError, match="seq_len"):
        make()._inputs_and_targets(records)  # stream model given records: one byte short
    with pytest.raises(ValueError, match="uint8"):
        make()._inputs_and_targets(x.long())


def test_tail_scored_loss_counts_only_scored_targets():
    torch.manual_seed(0)
    model = make()
    model.configure_model()
    torch.nn.init.normal_(model.model.head.weight)
    x = torch.randint(0, 256, (3, SEQ + 1), dtype=torch.uint8)
    first = torch.tensor([0, 5, SEQ])
    nats, dims = model._nats((x, first))
    nll = F.cross_entropy(model(x[:, :-1].long()).transpose(1, 2), x[:, 1:].long(), reduction="none")
    expected = nll[0].sum() + nll[1, 5:].sum()
    torch.testing.assert_close(nats, expected)
    assert dims.item() == SEQ + (SEQ - 5)
    # Whole-window batches score everything.
    nats_all, dims_all = model._nats(x)
    torch.testing.assert_close(nats_all, nll.sum())
    assert dims_all.item() == 3 * SEQ


def test_untrained_model_scores_exactly_8_bits(tmp_path):
    model = make()
    (result,) = trainer(tmp_path).validate(model, DataLoader(text_windows(12), batch_size=4), verbose=False)
    assert result["val/bpd"] == pytest.approx(8.0, abs=1e-5)  # zero-initialized logits: uniform over 256 bytes


# ---------------------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------------------


def test_weight_decay_only_on_tensors_of_two_or_more_dims():
    model = make(decay_steps=100, warmup_steps=10, weight_decay=0.1, lr=1e-3)
    model.configure_model()
    config = model.configure_optimizers()
    decay, no_decay = config["optimizer"].param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert {"model.token_emb.weight", "model.pos_emb.axis0", "model.blocks.0.attn.qkv.weight"} <= decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert config["lr_scheduler"]["interval"] == "step"


class _NormRecordingAdamW(torch.optim.AdamW):
    """Fused AdamW that records the norm of the gradients it steps with, after the Trainer's clipping."""

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()  # forward, backward and the Trainer's gradient clipping
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        self.norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())
        super().step()
        return loss


class _FusedOptimizerModel(TextDensityModel):
    def configure_optimizers(self):
        self.optimizer = _NormRecordingAdamW(self.parameters(), lr=1e-3, fused=True)
        self.optimizer.norms = []
        return self.optimizer


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_fused_optimizer_is_clipped_without_a_grad_scaler(tmp_path, precision):
    """Fused AdamW (the model's choice on CUDA) with gradient clipping: Lightning's mixed-precision plugin refuses to
    clip an optimizer that could unscale gradients itself, though under bf16 nothing is scaled; the model clips it
    instead, and the optimizer steps with the clipped norm."""
    model = make(_FusedOptimizerModel)
    fit = trainer(tmp_path, max_steps=3, precision=precision, gradient_clip_val=1e-3)
    fit.fit(model, DataLoader(text_windows(12), batch_size=4))
    assert model.optimizer._step_supports_amp_scaling  # what Lightning's plugin refuses to clip
    assert len(model.optimizer.norms) == 3
    assert all(0 < norm <= 1e-3 * (1 + 1e-4) for norm in model.optimizer.norms), model.optimizer.norms


def test_warmup_then_cosine_to_zero():
    model = make(decay_steps=100, warmup_steps=10, lr=1e-3)
    model.configure_model()
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(101):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    assert lrs[55] == pytest.approx(0.5e-3) and lrs[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:11], strict=True))  # rises during warmup
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))  # then only falls
    assert WarmupCosine(0, 10)(0) == 1.0


def test_schedule_length_comes_from_the_trainer_and_must_be_finite():
    model = make(warmup_steps=10)
    model.configure_model()
    model._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))
    with pytest.raises(ValueError, match="max_steps"):
        model.configure_optimizers()
    model._trainer = SimpleNamespace(estimated_stepping_batches=40)
    assert model.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0].total_steps == 40


def test_warmup_longer_than_the_run_is_shortened_with_a_warning():
    model = make(warmup_steps=10)
    model.configure_model()
    model._trainer = SimpleNamespace(estimated_stepping_batches=8)
    with pytest.warns(UserWarning, match=r"warmup_steps=10 is not shorter than the whole run \(8 optimizer steps\)"):
        schedule = model.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert (schedule.warmup_steps, schedule.total_steps) == (0, 8)  # the first tenth of 8 steps
    model._trainer = SimpleNamespace(estimated_stepping_batches=1)  # fast_dev_run: one step at the full lr
    assert WarmupCosine(*model._schedule_steps())(0) == 1.0


def test_a_diverging_run_stops_with_the_step_and_keeps_the_good_checkpoints(tmp_path):
    L.seed_everything(0)
    model = make(lr=1e3, warmup_steps=0, decay_steps=100)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/bpd", save_last=True)
    # val_check_interval=2: with 1, Lightning's ModelCheckpoint would save at epoch ends only
    t = trainer(tmp_path, max_steps=40, val_check_interval=2, limit_val_batches=1, enable_checkpointing=True,
                callbacks=[checkpoint])
    train = DataLoader(text_windows(160, seed=1), batch_size=4)
    with pytest.raises(DivergedError) as error:
        t.fit(model, train, DataLoader(text_windows(4, seed=2), batch_size=4))
    message = str(error.value)
    assert "diverged" in message and "lower learning rate (model.lr = 1000)" in message
    assert "gradient clipping (trainer.gradient_clip_val=1.0, now off)" in message
    step = int(re.search(r"step (\d+)", message).group(1))
    assert 0 < step < 40 and t.global_step == step
    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert saved, "the good steps before the divergence were checkpointed"
    for path in saved:  # no checkpoint holds a non-finite weight, last.ckpt included
        state = torch.load(path, weights_only=True)
        assert state["global_step"] < step
        assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))  # non-finite weights are never written, whatever the caller
    with pytest.raises(DivergedError, match="weights are NaN or infinite"):
        t.save_checkpoint(tmp_path / "ckpt" / "manual.ckpt")
    assert not (tmp_path / "ckpt" / "manual.ckpt").exists()


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(lr=0.0), "lr must be a finite number > 0"),
        (dict(lr=float("inf")), "lr must be a finite number > 0, got inf"),
        (dict(lr=float("nan")), "lr must be a finite number > 0, got nan"),
        (dict(weight_decay=-0.1), "weight_decay"),
        (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(betas=(float("nan"), 0.9)), "betas must be two numbers in"),
        (dict(betas=(0.9, float("-inf"))), "betas must be two numbers in"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(decay_steps=2, warmup_steps=2), "decay_steps"),
        (dict(n_head=3), "n_head=3"),
    ],
)
def test_bad_module_arguments_raise_with_the_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        make(**overrides)


def test_position_shape_hook_shapes_the_embeddings():
    class RecordModel(DensityModel):
        def position_shape(self, seq_len, pattern):
            return (4, 4, seq_len // 16)

    model = make(RecordModel, seq_len=48, start_token=True)
    model.configure_model()
    assert [t.shape[0] for t in model.model.pos_emb.tables()] == [4, 4, 3]
    model.configure_model()  # idempotent: the network is built once
    assert model.model.config.position_shape == (4, 4, 3)
    with pytest.raises(RuntimeError, match="configure_model"):
        make()(torch.zeros(1, SEQ, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------------------
# Training, checkpoints and samples
# ---------------------------------------------------------------------------------------------------------------


def test_training_lowers_val_bpd_and_checkpoint_reloads_to_the_same_value(tmp_path):
    L.seed_everything(0)
    model = make(dropout=0.1)
    train = DataLoader(text_windows(64, seed=1), batch_size=8, shuffle=True)
    val = DataLoader(text_windows(12, seed=2), batch_size=4)
    t = trainer(tmp_path, max_steps=8)
    t.fit(model, train, val)
    (before,) = t.validate(model, val, verbose=False)
    assert before["val/bpd"] < 7.0  # learned from 8.0
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = TextDensityModel.load_from_checkpoint(path)  # torch.load(weights_only=True) with Pattern hparams
    assert loaded.hparams.pattern == Fixed(4, 1) and loaded.hparams.dropout == 0.1
    (after,) = trainer(tmp_path).validate(loaded, val, verbose=False)
    assert after["val/bpd"] == before["val/bpd"]


def read_texts(log_dir) -> dict[str, list[str]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    return {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)] for tag in acc.Tags()["tensors"]}


@pytest.mark.parametrize("prompt", [None, "def "])
def test_text_sample_is_logged_to_tensorboard(tmp_path, prompt):
    L.seed_everything(0)
    model = make()
    logger = TensorBoardLogger(tmp_path, name="tb", default_hp_metric=False)
    val_windows = text_windows(8, seed=2)
    callback = TextSampleLogger(length=10, prompt_length=5, prompt=prompt)
    t = trainer(tmp_path, max_steps=4, val_check_interval=2, logger=logger, callbacks=[callback])
    t.fit(model, DataLoader(text_windows(32, seed=1), batch_size=8), DataLoader(val_windows, batch_size=4))
    (texts,) = [v for k, v in read_texts(logger.log_dir).items() if k.startswith("samples/text")]
    assert len(texts) == 2  # one per validation
    expected_prompt = prompt or bytes(val_windows[0][:5].tolist()).decode()
    for text in texts:
        assert f"**prompt** ({len(expected_prompt)} bytes)\n\n```\n{expected_prompt}\n```" in text
        assert "**sample** (10 bytes, temperature 1.0" in text and text.endswith("```")


def test_markdown_code_block_survives_backticks_and_bad_utf8():
    assert markdown_code_block("a ``` b") == "````\na ``` b\n````"
    assert markdown_code_block("x") == "```\nx\n```"
    trainer_ = SimpleNamespace(loggers=[], global_step=0)
    TextSampleLogger().write(trainer_, make(), (torch.tensor([START, 65]), torch.tensor([0xFF, 0xC3, 66])))  # fine


def test_text_sample_logger_checks_that_prompt_and_sample_fit_the_context():
    with pytest.raises(ValueError, match="need 19 input positions but the model's seq_len is 16"):
        TextSampleLogger(length=10, prompt_length=10).setup(None, make(), "fit")
    with pytest.raises(ValueError, match="non-empty string"):
        TextSampleLogger(prompt="")
