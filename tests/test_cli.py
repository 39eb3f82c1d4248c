"""The ``lightning-sparse`` CLI: every config prints, patterns parse from YAML, and fit/validate/test/predict run end to
end on a tiny corpus, with ``val/bpd`` read back from the TensorBoard event file."""

import random
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_sparse.cli import build_cli, cli_main
from lightning_sparse.kernels import Fixed, Interleaved, Local, StridedColumns
from lightning_sparse.text import TextDensityModel

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def write_tiny_corpus(folder: Path, size: int = 21_000) -> str:
    """Deterministic code-like text in three files; returns a glob naming them."""
    rng = random.Random(0)
    words = ["def", "return", "self", "value", "index", "import", "for", "in", "if", "else", "None", "x", "y"]
    text = "".join(
        f"{' ' * 4 * rng.randint(0, 2)}{' '.join(rng.choices(words, k=rng.randint(2, 6)))}\n" for _ in range(size // 10)
    )
    data = text.encode()[:size]
    folder.mkdir(parents=True, exist_ok=True)
    for i, part in enumerate((data[: size // 3], data[size // 3 : 2 * size // 3], data[2 * size // 3 :])):
        (folder / f"part{i}.txt").write_bytes(part)
    return str(folder / "*.txt")


def tiny_config(tmp_path: Path, name: str = "e2e", **trainer) -> Path:
    """A fast CLI config over a tiny corpus: one small block of fixed attention, validation at the end of the epoch."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 6,
            "num_sanity_val_steps": 0,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "gradient_clip_val": 1.0,
            "callbacks": [
                {
                    "class_path": "lightning_sparse.sample_logging.TextSampleLogger",
                    "init_args": {"length": 8, "prompt_length": 4},
                }
            ],
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(tmp_path / "runs"), "name": name, "default_hp_metric": False},
            },
            **trainer,
        },
        "model": {
            "class_path": "lightning_sparse.text.TextDensityModel",
            "init_args": {
                "n_layer": 1,
                "n_head": 2,
                "d_model": 32,
                "pattern": {"class_path": "lightning_sparse.kernels.Fixed", "init_args": {"stride": 8, "summary": 2}},
                "lr": 3e-3,
                "warmup_steps": 2,
            },
        },
        "data": {
            "class_path": "lightning_sparse.datamodules.ByteCorpusDataModule",
            "init_args": {
                "paths": [write_tiny_corpus(tmp_path / "corpus")],
                "seq_len": 32,
                "batch_size": 4,
                "cache_dir": str(tmp_path / "cache"),
                "train_samples": 24,  # 6 steps of 4 per epoch (per process)
            },
        },
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    """The CLI reads its arguments from ``args``; keep pytest's own command line out of its view."""
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])


def scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of a TensorBoard scalar, read from the event file(s) in ``log_dir``."""
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def print_config(args: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args + ["--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_print_config_works_and_round_trips(config, capsys, tmp_path):
    printed = print_config(["fit", "--config", str(config)], capsys)
    assert "class_path" in yaml.safe_load(printed)["model"]
    # The printed config is itself a valid config that prints the same.
    (tmp_path / "printed.yaml").write_text(printed)
    assert print_config(["fit", "--config", str(tmp_path / "printed.yaml")], capsys) == printed


def test_quickstart_config_exists():
    assert ROOT / "configs" / "quickstart.yaml" in CONFIGS


def test_patterns_parse_from_yaml_including_interleaved_and_tuples(tmp_path, capsys):
    config = yaml.safe_load(tiny_config(tmp_path).read_text())
    config["model"]["init_args"]["n_head"] = 4
    config["model"]["init_args"]["pattern"] = {
        "class_path": "lightning_sparse.kernels.Interleaved",
        "init_args": {
            "patterns": [
                {"class_path": "lightning_sparse.kernels.Local", "init_args": {"width": 8}},
                {"class_path": "lightning_sparse.kernels.StridedColumns", "init_args": {"stride": 8}},
                {
                    "class_path": "lightning_sparse.kernels.Fixed",
                    "init_args": {"stride": 8, "summary": 2, "summary_positions": [0, 1]},
                },
            ]
        },
    }
    path = tmp_path / "interleaved.yaml"
    path.write_text(yaml.safe_dump(config))
    expected = Interleaved((Local(8), StridedColumns(8), Fixed(8, 2, (0, 1))))
    cli = build_cli(["--config", str(path)], run=False)  # run=False: no subcommand
    assert cli.model.config.pattern == expected
    assert cli.model.hparams.seq_len == 32  # linked from data.seq_len
    printed = yaml.safe_load(print_config(["fit", "--config", str(path)], capsys))  # printed, then parsed back
    assert printed["model"]["init_args"]["pattern"]["class_path"] == "lightning_sparse.kernels.Interleaved"
    for key in ("ckpt_path", "weights_only"):  # arguments of the fit subcommand, unknown without one (run=False)
        del printed[key]
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert build_cli(["--config", str(tmp_path / "printed.yaml")], run=False).model.config.pattern == expected


def test_seq_len_is_set_once_on_the_data(tmp_path):
    config = tiny_config(tmp_path)
    assert build_cli(["--config", str(config)], run=False).model.config.seq_len == 32
    cli = build_cli(["--config", str(config), "--data.init_args.seq_len", "48"], run=False)
    assert cli.model.config.seq_len == cli.datamodule.seq_len == 48  # the model follows the data


def test_data_paths_take_one_file_or_a_list(tmp_path):
    config = tiny_config(tmp_path)
    one, two = tmp_path / "one.txt", tmp_path / "two.txt"
    for path, value in ((one, str(one)), (two, f"[{one}, {two}]")):
        path.write_bytes(b"x" * 100)
        cli = build_cli(["--config", str(config), "--data.init_args.paths", value], run=False)
        assert cli.datamodule.paths == ([str(one)] if path == one else [str(one), str(two)])


def test_fit_validate_test_predict_end_to_end(tmp_path):
    config = tiny_config(tmp_path)
    cli_main(["fit", "--config", str(config)])
    log_dir = tmp_path / "runs" / "e2e" / "version_0"
    ((step, val_bpd),) = scalars(log_dir, "val/bpd")
    assert step == 5 and 0 < val_bpd < 8.0  # one validation, after 6 steps; learned something from 8 bits
    assert scalars(log_dir, "train/bpd")[0][1] == pytest.approx(8.0, abs=1e-4)  # zero-initialized logits
    assert scalars(log_dir, "lr-AdamW/pg1")  # LearningRateMonitor is on by default
    assert (log_dir / "config.yaml").exists() and (log_dir / "hparams.yaml").exists()
    checkpoints = sorted(p.name for p in (log_dir / "checkpoints").iterdir())
    best = next(log_dir / "checkpoints" / n for n in checkpoints if n != "last.ckpt")
    assert checkpoints == ["last.ckpt", f"step0000006-val_bpd{val_bpd:.4f}.ckpt"]

    # The checkpoint restores the model (hyperparameters from the checkpoint) and gives the same val bpd.
    cli_main(["validate", "--config", str(config), "--ckpt_path", str(best)])
    ((_, reloaded),) = scalars(log_dir / "validate", "val/bpd")  # logged beside the run that wrote the checkpoint
    assert reloaded == pytest.approx(val_bpd, rel=1e-6)
    cli_main(["test", "--config", str(config), "--ckpt_path", str(best)])
    ((_, test_bpd),) = scalars(log_dir / "test", "test/bpd")
    assert 0 < test_bpd < 8.0
    cli = build_cli(["--config", str(config)], run=False)
    loaded = TextDensityModel.load_from_checkpoint(best)  # hparams saved by the CLI as config dicts
    assert loaded.config == cli.model.config and loaded.config.pattern == Fixed(8, 2)
    predictions = cli.trainer.predict(cli.model, datamodule=cli.datamodule, ckpt_path=str(best))
    assert predictions[0].shape == (4,) and all(0 < p.min() and p.max() < 12 for p in predictions)
