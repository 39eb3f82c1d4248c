"""The CLI as a newcomer meets it: a bad value gives one short message naming the key, ``--debug`` gives the
traceback, ``--version`` and ``--model.help <short name>`` work, a GPU config on a CPU machine says what to add, and
``fast_dev_run`` / ``validate`` / ``test`` leave no stray folders."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_cli import scalars, tiny_config

from lightning_sparse.cli import DEBUG_ENV, cli_main, package_version

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def command_line(monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-sparse"])
    monkeypatch.delenv(DEBUG_ENV, raising=False)


def run_cli(args: list[str], capsys) -> tuple[int, str]:
    """Exit status and stderr of the CLI run in this process."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    return exit_info.value.code, capsys.readouterr().err


BAD_VALUES = [  # (arguments after the tiny config, the key the message must name, a phrase of the reason)
    (["--model.init_args.pattern.init_args.stride=0"], "model.init_args.pattern.init_args.stride", "positive"),
    (["--model.init_args.n_head=3"], "model.init_args.n_head", "divisible"),
    (["--model.init_args.lr=-1"], "model.init_args.lr", "finite number > 0"),
    (["--model.class_path=lightning_sparse.text.NoSuchModel"], "model", "NoSuchModel"),
    (["--model.init_args.attention_backend=cuda"], "model.init_args.attention_backend", "must be one of"),
    (["--model.init_args.position_shape=[4, 9]"], "model.init_args.position_shape", "32"),
    (["--trainer.precision=bad"], "trainer.precision", "bf16-mixed"),
    (["--data.init_args.batch_size=0"], "data.init_args.batch_size", "positive integer"),
    (["--model.init_args.betas=[0.9, 1.5]"], "model.init_args.betas", "[0, 1)"),
    (["--model.init_args.warmup_steps=-2"], "model.init_args.warmup_steps", ">= 0"),
    (["--trainer.max_steps=many"], "trainer.max_steps", "many"),
]


@pytest.mark.parametrize("extra, key, reason", BAD_VALUES, ids=[b[1] for b in BAD_VALUES])
def test_a_bad_value_gives_a_short_message_naming_the_key(tmp_path, capsys, extra, key, reason):
    status, err = run_cli(["fit", "--config", str(tiny_config(tmp_path)), *extra], capsys)
    assert status == 2
    assert len(err.strip().splitlines()) < 10, err
    assert err.startswith("error: ") and key in err.splitlines()[0].split(": ")[1] and reason in err, err
    assert "Traceback" not in err and "usage:" not in err and "does not correspond to a subclass" not in err


def test_an_image_config_whose_seq_len_is_not_its_image_size_names_the_key(capsys):
    status, err = run_cli(["fit", "--config", str(ROOT / "configs" / "cifar10.yaml"),
                           "--data.init_args.seq_len=3000"], capsys)
    assert status == 2 and len(err.splitlines()) < 10
    assert "seq_len" in err.splitlines()[0] and "seq_len=3000 but image_shape=(32, 32, 3)" in err


def test_a_diverging_cli_run_ends_with_one_message(tmp_path, capsys):
    status, err = run_cli(["fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.lr=1000",
                           "--trainer.max_steps=60"], capsys)
    assert status == 1 and len(err.strip().splitlines()) == 2, err
    assert err.startswith("error: DivergedError: The training loss diverged: it is nan in optimizer step ")
    assert "a smaller gradient clipping value (trainer.gradient_clip_val, now 1)" in err
    for path in (tmp_path / "runs").rglob("*.ckpt"):
        weights = torch.load(path, weights_only=True)["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())


def test_debug_flag_and_environment_variable_give_the_full_traceback(tmp_path, capsys, monkeypatch):
    args = ["fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.lr=-1"]
    with pytest.raises(ValueError, match="lr must be a finite number") as error:
        cli_main([*args, "--debug"])
    assert error.value.__cause__ is not None or "Given value" in str(error.value)  # jsonargparse's full report
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        cli_main(args)


def test_console_script_output_is_short(tmp_path):
    script = Path(sys.executable).parent / "lightning-sparse"
    result = subprocess.run([str(script), "fit", "--config", str(tiny_config(tmp_path)), "--model.init_args.n_head=3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert len((result.stdout + result.stderr).strip().splitlines()) < 10, result.stdout + result.stderr
    assert "model.init_args.n_head" in result.stderr and "Traceback" not in result.stderr


def test_version_and_help_of_a_model_by_its_short_name(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip().endswith(package_version())
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--model.help", "TextDensityModel"])
    assert exit_info.value.code == 0 and "--model.n_layer" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU: the paper config runs")
def test_a_paper_config_without_a_gpu_says_to_add_the_cpu_accelerator(capsys):
    status, err = run_cli(["fit", "--config", str(ROOT / "configs" / "enwik8.yaml")], capsys)
    assert status == 2
    first, *rest = err.strip().splitlines()
    assert "add `--trainer.accelerator cpu`" in first and first.startswith("error: trainer.accelerator")
    assert len(rest) <= 1  # only the --debug hint


def test_fast_dev_run_writes_no_checkpoints_and_validate_test_log_beside_the_run(tmp_path, monkeypatch):
    config = tiny_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(config), "--trainer.fast_dev_run=true"])
    assert not list(tmp_path.rglob("checkpoints")) and not list(tmp_path.rglob("*.ckpt"))

    cli_main(["fit", "--config", str(config)])
    run = tmp_path / "runs" / "e2e" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    cli_main(["validate", "--config", str(config), "--ckpt_path", str(last)])
    cli_main(["test", "--config", str(config), "--ckpt_path", str(last)])
    assert sorted(p.name for p in (tmp_path / "runs" / "e2e").iterdir()) == ["version_0"]  # no new version_N
    ((_, fitted),) = scalars(run, "val/bpd")
    ((_, validated),) = scalars(run / "validate", "val/bpd")
    assert validated == pytest.approx(fitted, rel=1e-6)
    assert scalars(run / "test", "test/bpd")
    assert yaml.safe_load((run / "validate" / "config.yaml").read_text())["ckpt_path"] == str(last)
