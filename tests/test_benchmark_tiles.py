"""train_step.py --tiles: a sweep's fastest tiles (attention.py --sweep --json) put in force for a whole run."""

import contextlib
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

from lightning_sparse.kernels.tiles import BwdTiles, FwdTiles, select_tiles

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import train_step  # noqa: E402  (benchmarks/train_step.py)


def test_sweep_choices_are_in_force_and_only_for_their_widths(tmp_path):
    bwd = BwdTiles(16, 64, 64, 64, warps=4, stages=2, maxnreg=168)
    fwd = FwdTiles(32, 64, warps=4, stages=4)
    records = [
        {"shape": "enwik8", "d_qk": 64, "d_v": 64, "kind": "bwd", "layout": "natural", "cand": repr(bwd), "ms": 1.0},
        {"shape": "enwik8", "d_qk": 64, "d_v": 64, "kind": "bwd", "layout": "natural", "best": repr(bwd),
         "tiles": dataclasses.asdict(bwd), "ms": 1.0},
        {"shape": "cifar10", "d_qk": 64, "d_v": 128, "kind": "fwd", "layout": "local", "best": repr(fwd),
         "tiles": dataclasses.asdict(fwd), "ms": 0.5},
    ]
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"sweep": records}))
    before = select_tiles("bwd", "natural", 64, 64, torch.bfloat16)
    assert before != bwd
    with contextlib.ExitStack() as stack:
        lines = train_step.sweep_choices(path, stack)
        assert select_tiles("bwd", "natural", 64, 64, torch.bfloat16) == bwd
        assert select_tiles("fwd", "local", 64, 128, torch.bfloat16) == fwd
        assert select_tiles("bwd", "natural", 32, 32, torch.bfloat16) != bwd  # other widths keep their tiles
        assert len(lines) == 2 and "('bwd', 'natural', 64, 64)" in lines[0]
    assert select_tiles("bwd", "natural", 64, 64, torch.bfloat16) == before


@pytest.mark.parametrize("text", ["not json", '{"rows": []}', '{"sweep": [{"kind": "fwd"}]}',
                                  '{"sweep": [{"kind": "bwd", "layout": "natural", "d_qk": 64, "d_v": 64, '
                                  '"tiles": {"bm": 64}}]}'])
def test_sweep_choices_reject_files_that_are_not_a_sweep(tmp_path, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(SystemExit, match="--tiles"), contextlib.ExitStack() as stack:
        train_step.sweep_choices(path, stack)
