"""``lightning-sparse sample``: turn a checkpoint into text, images or audio files with the KV-cached sampler.

    lightning-sparse sample --ckpt_path runs/enwik8/version_0/checkpoints/last.ckpt --prompt "The " --num 4
    lightning-sparse sample --ckpt_path runs/cifar10/version_0/checkpoints/last.ckpt --complete_from val
    lightning-sparse sample --config configs/audio_65k.yaml --ckpt_path last.ckpt --complete_from val --length 12000

The model comes from the checkpoint alone (its saved hyperparameters; ``fit`` through the CLI also records the
class). The config — ``--config``, else the run's ``config.yaml`` next to ``checkpoints/`` — is read only for the
data module, which ``--complete_from val`` needs. Outputs under ``--out``: text as ``sample_NNN.txt`` (prompt and
sample bytes; also printed), images as ``grid.png`` plus ``image_NNN.png`` (completions: real images over their
completions in the grid), audio as ``sample_NNN.wav`` (prompt and sample, μ-law decoded, at the model's rate).
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
from pathlib import Path

import torch
import yaml

from lightning_sparse.atomic import atomic_write
from lightning_sparse.yaml_objects import instantiate

__all__ = ["sample_main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-sparse sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_path", required=True, type=Path, help="checkpoint saved by fit (or Trainer.save_checkpoint)")
    p.add_argument("--config", type=Path, help="the run's config (default: config.yaml next to checkpoints/)")
    p.add_argument("--num", type=int, default=16, help="sequences to generate, as one batch (default 16)")
    p.add_argument("--length", type=int, help="new positions per sequence (default: text 512, audio 1 s, images: "
                                              "the rest of the image; capped by the context)")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature (default 1.0, the paper's)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--prompt", help="text prompt (text models)")
    source.add_argument("--prompt_file", type=Path, help="prompt file: raw bytes (text) or an audio file (audio)")
    source.add_argument("--complete_from", choices=["val"], help="continue real validation data (images: complete "
                                                                 "the top halves of validation images)")
    p.add_argument("--prompt_length", type=int, help="bytes of each validation sequence given as the prompt "
                                                     "(text 64, audio 1 s; images always give the top half)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (default 0)")
    p.add_argument("--out", type=Path, default=Path("samples"), help="output folder (default samples/)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", choices=["auto", "32", "bf16"], default="auto",
                   help="bf16 autocast or float32; auto = bf16 on CUDA, float32 on the CPU")
    return p


def _class(path: str) -> type:
    from lightning_sparse.modules import DensityModel

    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name, None)
    if not (isinstance(cls, type) and issubclass(cls, DensityModel)):
        raise SystemExit(f"sample: {path!r} is not a lightning_sparse DensityModel class.")
    return cls


def _config(args: argparse.Namespace) -> dict | None:
    path = args.config or args.ckpt_path.resolve().parent.parent / "config.yaml"
    if not path.is_file():
        if args.config:
            raise SystemExit(f"sample: --config {path} does not exist.")
        return None
    return yaml.safe_load(path.read_text())


def load_module(args: argparse.Namespace, config: dict | None, device: torch.device):
    """The LightningModule of the checkpoint, network built and weights loaded, in eval mode on ``device``."""
    if not args.ckpt_path.is_file():
        raise SystemExit(f"sample: --ckpt_path {args.ckpt_path} does not exist.")
    hparams = torch.load(args.ckpt_path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
    class_path = hparams.get("_class_path") or ((config or {}).get("model") or {}).get("class_path")
    if class_path is None:
        raise SystemExit("sample: the checkpoint does not name its model class; pass --config with model.class_path.")
    module = _class(class_path).load_from_checkpoint(args.ckpt_path, map_location=device)
    module.configure_model()
    return module.to(device).eval()


def validation_items(config: dict | None, num: int, seq_len: int) -> list[torch.Tensor]:
    """The first ``num`` real (non-padding) validation sequences of the config's data module, uint8."""
    if config is None or "data" not in config:
        raise SystemExit("sample: --complete_from val needs the run's config (--config, or config.yaml next to "
                         "checkpoints/) to build the data module.")
    data = instantiate(config["data"])
    data.prepare_data()
    data.setup("validate")
    items: list[torch.Tensor] = []
    for item in data.val_set:
        window, first_scored = item if isinstance(item, (tuple, list)) else (item, 0)
        window = torch.as_tensor(window)
        if int(first_scored) >= len(window) - (0 if len(window) == seq_len else 1):
            continue  # padding added for DDP: it scores nothing and is no real sequence
        items.append(window)
        if len(items) == num:
            break
    if len(items) < num:
        raise SystemExit(f"sample: the validation set has {len(items)} sequences, fewer than --num {num}.")
    return items


def _write(path: Path, data: bytes) -> None:
    with atomic_write(path) as f:
        f.write(data)


def _png(image: torch.Tensor) -> bytes:
    from torchvision.io import encode_png

    return bytes(encode_png(image.contiguous()).numpy())


def _wav(wave: torch.Tensor, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, wave.numpy(), rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _progress(total: int):
    from tqdm import tqdm

    return tqdm(total=total, unit="pos", desc="sampling", file=sys.stderr, dynamic_ncols=True)


def run_images(args, module, config, generator, device) -> list[Path]:
    from lightning_sparse.image import image_grid, sequences_to_images
    from lightning_sparse.sample_logging import generate_images

    shape = module.image_shape
    h, w, c = shape
    real = None
    if args.complete_from:
        real = torch.stack(validation_items(config, args.num, module.config.seq_len))
    total = (module.config.seq_len - (h // 2) * w * c) if real is not None else module.config.seq_len
    with _progress(total) as bar:
        samples, completions = generate_images(module.model, shape, 0 if real is not None else args.num, real,
                                               generator, progress=bar.update)
    images = sequences_to_images((completions if real is not None else samples).cpu(), shape)
    grid = images if real is None else torch.cat([sequences_to_images(real, shape), images])
    paths = [args.out / "grid.png"]
    _write(paths[0], _png(image_grid(grid, nrow=len(images) if real is not None else min(8, len(images)))))
    for i, image in enumerate(images):
        paths.append(args.out / f"image_{i:03d}.png")
        _write(paths[-1], _png(image))
    return paths


def _stream_prompts(args, module, config) -> torch.Tensor:
    """Prompts ``[num, p]`` of a text or audio model."""
    audio = hasattr(module, "sample_rate")
    if args.complete_from:
        length = args.prompt_length or min(module.sample_rate if audio else 64, module.config.seq_len // 2)
        items = validation_items(config, args.num, module.config.seq_len)
        return torch.stack([x[:length] for x in items]).long()
    if args.prompt is not None or args.prompt_file is not None:
        if audio:
            if args.prompt is not None:
                raise SystemExit("sample: an audio model takes --prompt_file AUDIO or --complete_from val, not --prompt.")
            from lightning_sparse.datamodules.audio import encode_file

            codes = torch.from_numpy(encode_file(str(args.prompt_file), module.sample_rate))
        else:
            raw = args.prompt.encode() if args.prompt is not None else args.prompt_file.read_bytes()
            codes = torch.tensor(list(raw), dtype=torch.uint8)
        if len(codes) == 0:
            raise SystemExit("sample: the prompt is empty.")
        return codes.long()[None].expand(args.num, -1)
    first = 128 if audio else ord("\n")  # μ-law silence / a newline: a neutral one-byte start
    return torch.full((args.num, 1), first, dtype=torch.long)


def run_stream(args, module, config, generator, device) -> list[Path]:
    from lightning_sparse.sampling import sample

    audio = hasattr(module, "sample_rate")
    prompts = _stream_prompts(args, module, config)
    p = prompts.shape[1]
    room = module.config.seq_len - p + 1
    length = args.length if args.length is not None else min(room, module.sample_rate if audio else 512)
    if length <= 0:
        raise SystemExit(f"sample: a {p}-byte prompt leaves no room in the {module.config.seq_len}-position "
                         "context; shorten the prompt (--prompt_length).")
    with _progress(length) as bar:
        out = sample(module.model, prompts.to(device), length, temperature=args.temperature, generator=generator,
                     progress=bar.update).cpu()
    paths = []
    for i, (prompt, new) in enumerate(zip(prompts, out, strict=True)):
        if audio:
            from lightning_sparse.audio import mu_law_decode

            paths.append(args.out / f"sample_{i:03d}.wav")
            _write(paths[-1], _wav(mu_law_decode(torch.cat([prompt, new])), module.sample_rate))
        else:
            data = bytes(prompt.tolist()) + bytes(new.tolist())
            paths.append(args.out / f"sample_{i:03d}.txt")
            _write(paths[-1], data)
            print(f"===== sample {i} ({p} prompt + {length} sampled bytes) =====")
            print(data.decode("utf-8", errors="replace"))
    return paths


def sample_main(argv: list[str]) -> None:
    """Run ``lightning-sparse sample`` with ``argv`` (the arguments after ``sample``)."""
    args = _parser().parse_args(argv)
    if args.num <= 0:
        raise SystemExit(f"sample: --num must be a positive integer, got {args.num}.")
    if not args.temperature > 0:
        raise SystemExit(f"sample: --temperature must be > 0, got {args.temperature}.")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    config = _config(args)
    module = load_module(args, config, device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    bf16 = args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    if hasattr(module, "image_shape") and (args.prompt is not None or args.prompt_file is not None):
        raise SystemExit("sample: an image model samples whole images or --complete_from val; no --prompt.")
    run = run_images if hasattr(module, "image_shape") else run_stream
    try:
        with torch.no_grad(), autocast:
            paths = run(args, module, config, generator, device)
    except ValueError as err:  # a request the model cannot serve (e.g. beyond its context): say why, no traceback
        raise SystemExit(f"sample: {err}") from err
    print(f"wrote {len(paths)} files to {args.out}", file=sys.stderr)
