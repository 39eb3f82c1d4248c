"""ByteCorpusDataModule: any files as one byte stream; by default the running Python's standard library sources."""

from __future__ import annotations

import glob
import hashlib
import os
import sysconfig
from pathlib import Path

from .base import StreamDataModule
from .store import SourceReader, default_cache_dir, read_cache, write_cache

_GLOB_CHARS = set("*?[")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_sources() -> list[Path]:
    """The `.py` files of the running Python's standard library, sorted (site-packages excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _EXCLUDED_DIRS)
        found.extend(Path(folder) / f for f in files if f.endswith(".py"))
    return sorted(found)


def resolve_paths(paths: list[str]) -> list[Path]:
    """Expand files, folders (all files below, sorted) and globs (sorted) in order, without duplicates."""
    out: dict[Path, None] = {}
    for entry in paths:
        expanded = os.path.expanduser(entry)
        if _GLOB_CHARS & set(expanded):
            matches = sorted(Path(m) for m in glob.glob(expanded, recursive=True) if os.path.isfile(m))
            if not matches:
                raise FileNotFoundError(f"ByteCorpusDataModule: the glob {entry!r} matches no file; fix the pattern "
                                        "or the current directory")
            out.update(dict.fromkeys(m.resolve() for m in matches))
        elif os.path.isdir(expanded):
            matches = sorted(p for p in Path(expanded).rglob("*") if p.is_file())
            if not matches:
                raise FileNotFoundError(f"ByteCorpusDataModule: the folder {entry!r} contains no file")
            out.update(dict.fromkeys(m.resolve() for m in matches))
        elif os.path.isfile(expanded):
            out[Path(expanded).resolve()] = None
        else:
            raise FileNotFoundError(f"ByteCorpusDataModule: path {entry!r} does not exist; give existing files, "
                                    "folders or globs in `paths` (or none for the standard-library corpus)")
    return list(out)


class ByteCorpusDataModule(StreamDataModule):
    """Bytes of the files you name, concatenated in order, as one stream split 90/5/5 (train/val/test).

    With `paths=None` the corpus is the `.py` files of the running Python's standard library (≈30 MB, sorted),
    so it works offline anywhere. The concatenation is cached once as a uint8 file in `cache_dir`, named after the
    file list; its manifest fingerprints every file (see `store.py`), so an edited file, also one rewritten at the
    same size with its mtime restored, rebuilds the cache in place of the old one. Training draws
    `train_samples` random crops of `seq_len + 1` bytes per epoch (default: train bytes // seq_len), uint8
    [seq_len + 1] tensors. Validation and test use non-overlapping windows given as (window uint8 [seq_len + 1],
    first_scored) pairs (see `TailScoredWindows`): every byte of the split is a target exactly once, also under
    DDP, where windows that score nothing pad the set to a multiple of the number of processes.

    Args:
        paths: files, folders or globs (`**` allowed), one or a list; None for the standard-library corpus.
        seq_len: model context; samples are `seq_len + 1` bytes.
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        cache_dir: folder of the cache (default `~/.cache/lightning_sparse/byte_corpus`).
        verify: hash the cache and every corpus file in full before use (rebuilding what does not match).
        train_samples: random crops per training epoch (default train bytes // seq_len).
        val_fraction: fraction of the stream for validation (taken after the training part).
        test_fraction: fraction of the stream for test (the end of the stream).
        pin_memory: DataLoader `pin_memory`.
        seed: seed of the training crops (combined with the epoch).
    """

    def __init__(
        self,
        paths: list[str] | str | None = None,
        seq_len: int = 1024,
        batch_size: int = 16,
        num_workers: int = 0,
        cache_dir: str | None = None,
        verify: bool = False,
        train_samples: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        pin_memory: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(seq_len=seq_len, batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory,
                         seed=seed, train_samples=train_samples)
        if isinstance(paths, str):
            paths = [paths]
        if paths is not None and len(paths) == 0:
            raise ValueError("ByteCorpusDataModule: paths=[] names no file; give files/globs or None for the "
                             "standard-library corpus")
        if not (0 < val_fraction < 1 and 0 < test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in (0, 1) "
                             "with a sum below 1")
        self.paths = paths
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir() / "byte_corpus"
        self.verify = verify
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

    def files(self) -> list[Path]:
        """The corpus files in stream order."""
        files = stdlib_sources() if self.paths is None else resolve_paths(self.paths)
        if not files:
            raise FileNotFoundError("ByteCorpusDataModule: no standard-library .py files found under "
                                    f"{sysconfig.get_paths()['stdlib']}; name your own files in `paths`")
        return files

    def cache_path(self, files: list[Path] | None = None) -> Path:
        """Cache file of the current corpus, named after its file list (its content is in the manifest)."""
        key = hashlib.sha256()
        for f in files if files is not None else self.files():
            key.update(f"{f}\n".encode())
        return self.cache_dir / f"corpus-{key.hexdigest()[:20]}.u8"

    def split_bounds(self, total: int) -> dict[str, tuple[int, int]]:
        """Contiguous [start, stop) byte ranges of train, val and test for a stream of `total` bytes."""
        n_val, n_test = int(total * self.val_fraction), int(total * self.test_fraction)
        n_train = total - n_val - n_test
        return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, total)}

    def prepare_folder(self) -> Path:
        """The folder prepared (and locked meanwhile): `cache_dir`."""
        return self.cache_dir

    def prepare(self) -> None:
        """Concatenate the corpus into the uint8 cache once (rebuilt when missing, incomplete or out of date)."""
        files = self.files()
        cache = self.cache_path(files)
        total = sum(f.stat().st_size for f in files)
        if read_cache(cache, {"nbytes": total}, verify=self.verify) is not None:
            return
        if total == 0:
            raise ValueError(f"ByteCorpusDataModule: the corpus ({len(files)} files, first {files[0]}) is empty; "
                             "name files that contain bytes")

        reader = SourceReader()
        manifest = write_cache(cache, (reader.read(f) for f in files), {"files": len(files), "first": str(files[0])},
                               sources=reader.sources)
        if manifest["nbytes"] != total:
            raise RuntimeError(f"ByteCorpusDataModule: corpus files changed while caching ({manifest['nbytes']} "
                               f"bytes read, {total} expected); run again")

    def setup(self, stage: str | None = None) -> None:
        """Open the cache and build the three splits."""
        files = self.files()
        cache = self.cache_path(files)
        manifest = read_cache(cache)
        if manifest is None:  # used without a Trainer and without prepare_data()
            self.prepare_data()
            manifest = read_cache(cache)
        total = manifest["nbytes"]
        if total == 0:
            raise ValueError("ByteCorpusDataModule: the corpus is empty; name files that contain bytes")
        bounds = self.split_bounds(total)
        window = self.seq_len + 1
        smallest = min(bounds.values(), key=lambda b: b[1] - b[0])
        if smallest[1] - smallest[0] < window:
            raise ValueError(
                f"ByteCorpusDataModule: the corpus has {total} bytes, so its smallest split has "
                f"{smallest[1] - smallest[0]} bytes, shorter than one window of seq_len + 1 = {window}; use a "
                f"larger corpus (at least ~{int(window / min(self.val_fraction, self.test_fraction)) + 1} bytes) "
                "or a smaller seq_len"
            )
        # Non-overlapping evaluation windows that score each val/test byte once (context may reach into the
        # previous split), padded with windows scoring nothing so that DDP evaluation equals one process's.
        self.setup_streams(train=(cache, [bounds["train"]]), val=(cache, [(0, *bounds["val"])], 0),
                           test=(cache, [(0, *bounds["test"])], 0))
