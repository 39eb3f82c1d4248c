"""A fake two-node job on CPU: 2 nodes × 2 processes with torchrun's environment variables (tests/multinode_run.py).

Checks what a real multi-node run relies on: Lightning's TorchElasticEnvironment reads the node rank from
GROUP_RANK; ``prepare_data`` runs once per node (on its local rank 0, ``prepare_data_per_node=True``, the
default, right for node-local disks); every rank of both nodes sees the same splits (the byte corpus's byte ranges,
the audio DataModule's hash split of file names, the validation windows) although each node reads its own copy of the
data under a different absolute path; and the distributed samplers give the four ranks disjoint validation windows
that cover the whole validation set and disjoint training crops.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import write_audio
from test_cli import write_tiny_corpus

RUN = Path(__file__).with_name("multinode_run.py")
NODES, PER_NODE = 2, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_node_data(root: Path) -> None:
    """node0/ and node1/ with identical copies of a text corpus and of 60 short audio clips."""
    pytest.importorskip("soundfile")
    write_tiny_corpus(root / "node0" / "corpus")
    rng = np.random.default_rng(0)
    for i in range(60):  # 60 files: the 5 % / 5 % hash split puts some in validation and test
        write_audio(root / "node0" / "audio" / f"clip{i:02d}.wav", rng.uniform(-0.5, 0.5, 800), 8000)
    shutil.copytree(root / "node0", root / "node1")


def test_prepare_data_once_per_node_and_identical_splits_on_every_rank(tmp_path):
    make_node_data(tmp_path)
    port = free_port()
    procs = []
    for rank in range(NODES * PER_NODE):
        env = {
            **os.environ,
            "TORCHELASTIC_RUN_ID": "fake-two-nodes",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(NODES * PER_NODE),
            "RANK": str(rank),
            "LOCAL_RANK": str(rank % PER_NODE),
            "LOCAL_WORLD_SIZE": str(PER_NODE),
            "GROUP_RANK": str(rank // PER_NODE),  # the node rank, as torchrun sets it
            "NODE_RANK": str(rank // PER_NODE),
        }
        procs.append(
            subprocess.Popen([sys.executable, str(RUN), str(tmp_path)], env=env, cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    errors = [p.communicate(timeout=300)[1] for p in procs]
    for p, err in zip(procs, errors, strict=True):
        assert p.returncode == 0, err[-4000:]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(NODES * PER_NODE)]

    for name in ("corpus", "audio"):
        # once per node, on each node's local rank 0 (global ranks 0 and 2)
        prepared = sorted(p.name for p in tmp_path.glob(f"prepared-{name}-rank*"))
        assert prepared == [f"prepared-{name}-rank0", f"prepared-{name}-rank2"], prepared
        per_rank = [r[name] for r in records]
        assert [r["node_rank"] for r in per_rank] == [0, 0, 1, 1]
        assert all(r["world_size"] == 4 for r in per_rank)
        for key in ("split", "val_hash", "val_len"):  # identical data splits on every rank of both nodes
            assert all(r[key] == per_rank[0][key] for r in per_rank), key
        val = [i for r in per_rank for i in r["val"]]
        assert sorted(val) == list(range(per_rank[0]["val_len"]))  # disjoint, and together the whole set
        train = [i for r in per_rank for i in r["train"]]
        assert len(train) == 8 and all(len(r["train"]) == 2 for r in per_rank)  # 8 crops split 2 per rank
    audio_split = records[0]["audio"]["split"]
    assert audio_split["val"] and audio_split["test"]  # the hash split put files in every split
