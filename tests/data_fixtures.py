"""Small dataset files in the exact on-disk formats of the real releases, and a local HTTP server to download them.

- `FileServer`: serves registered bytes on 127.0.0.1 with HTTP Range support; `cut_next(name, after)` makes the
  next response for `name` stop after `after` bytes (an interrupted download); `delay` seconds pass before each
  response (a slow server, so concurrent clients overlap); it records every request.
- `py2_pickle_dumps`: a protocol-2 pickle written the way Python 2's cPickle wrote CIFAR-10 (str as BINSTRING,
  numpy arrays through numpy.core.multiarray._reconstruct), so `pickle.load(f, encoding="bytes")` gives bytes keys.
- makers for enwik8.zip, cifar-10-python.tar.gz, the van den Oord ImageNet 64x64 PNG folders/tars, the Chrabaszcz
  et al. batches (pickle and npz, zipped as released) and audio folders.
"""

from __future__ import annotations

import http.server
import io
import pickle
import struct
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np


class FileServer:
    """A threaded HTTP server on 127.0.0.1 serving in-memory files, with Range requests and cut-short responses."""

    def __init__(self, support_range: bool = True, delay: float = 0.0) -> None:
        self.files: dict[str, bytes] = {}
        self.delay = delay
        self.cuts: dict[str, int] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.support_range = support_range
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                name = self.path.lstrip("/")
                rng = self.headers.get("Range")
                server.requests.append((name, rng))
                time.sleep(server.delay)
                if name not in server.files:
                    self.send_error(404)
                    return
                data = server.files[name]
                start = 0
                if rng and server.support_range:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                cut = server.cuts.pop(name, None)
                if cut is not None:  # simulate a dropped connection: send part of the body, then hang up
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def add(self, name: str, data: bytes) -> str:
        """Serve `data` at /name; returns its URL."""
        self.files[name] = data
        return self.url(name)

    def url(self, name: str) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def cut_next(self, name: str, after: int) -> None:
        """The next response for `name` sends only `after` bytes of its body and closes the connection."""
        self.cuts[name] = after


# ----------------------------------------------------------------------------------------------------------------
# Python 2 style pickles (CIFAR-10 python version)
# ----------------------------------------------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_str(self, obj: bytes) -> None:
        # Python 2 wrote its str (bytes) as SHORT_BINSTRING / BINSTRING, which Python 3 loads as bytes.
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + struct.pack("<B", n) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_py2_native_str(self, obj: str) -> None:
        # Names inside numpy's reduce values ("u1", "|", "b") were py2 str too.
        self.save_py2_str(obj.encode("latin1"))

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_native_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        # Python 2 era numpy lived at numpy.core.multiarray; numpy 2 names it numpy._core.
        if getattr(obj, "__name__", None) == "_reconstruct":
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)

    dispatch[type(len)] = save_global  # builtin functions such as numpy's _reconstruct


def py2_pickle_dumps(obj: object) -> bytes:
    """Pickle `obj` at protocol 2 as Python 2's cPickle did (dict keys and strings as py2 str)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


class _Evil:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        import os

        return (os.system, (self.command,))


def evil_pickle_bytes(command: str) -> bytes:
    """A CIFAR-like pickle whose load would run `command` through os.system (must be refused, never run)."""
    return pickle.dumps({b"data": _Evil(command), b"labels": []}, protocol=2)


# ----------------------------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------------------------


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A deflated zip with the given members (names are written as given, `../` included)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(2006, 3, 3, 0, 0, 0)), data)
    return buf.getvalue()


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz", links: dict[str, str] | None = None) -> bytes:
    """A tar (gzip by default) with the given files and symlinks (names written as given)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 1241000000
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


def enwik8_zip(data: bytes, extra: dict[str, bytes] | None = None) -> bytes:
    """enwik8.zip as released: one member named `enwik8` (plus `extra` members for attack tests)."""
    return zip_bytes({"enwik8": data, **(extra or {})})


# ----------------------------------------------------------------------------------------------------------------
# CIFAR-10
# ----------------------------------------------------------------------------------------------------------------

CIFAR_BATCHES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def cifar_batch(images_chw: np.ndarray, labels: list[int], batch_label: str) -> bytes:
    """One CIFAR-10 batch file: {data: uint8 [N, 3072] channel-major, labels, batch_label, filenames}."""
    n = len(images_chw)
    return py2_pickle_dumps({
        b"batch_label": batch_label.encode(),
        b"labels": list(labels),
        b"data": np.ascontiguousarray(images_chw.reshape(n, 3072), dtype=np.uint8),
        b"filenames": [f"image_{i:05d}.png".encode() for i in range(n)],
    })


def cifar_archive(per_batch: int, rng: np.random.Generator) -> tuple[bytes, dict[str, bytes], np.ndarray, np.ndarray]:
    """(cifar-10-python.tar.gz bytes, {file name: file bytes}, train images [5N,3,32,32], test images [N,3,32,32])."""
    files: dict[str, bytes] = {}
    train, test = [], None
    for k, name in enumerate(CIFAR_BATCHES):
        images = rng.integers(0, 256, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        title = "testing batch 1 of 1" if name == "test_batch" else f"training batch {k + 1} of 5"
        files[name] = cifar_batch(images, labels, title)
        if name == "test_batch":
            test = images
        else:
            train.append(images)
    files["batches.meta"] = py2_pickle_dumps({
        b"num_cases_per_batch": per_batch,
        b"label_names": [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                         b"truck"],
        b"num_vis": 3072,
    })
    members = {f"cifar-10-batches-py/{name}": data for name, data in files.items()}
    members["cifar-10-batches-py/readme.html"] = b"<meta HTTP-EQUIV='REFRESH' content='0; url=...'>\n"
    return tar_bytes(members), files, np.concatenate(train), test


# ----------------------------------------------------------------------------------------------------------------
# ImageNet 64x64
# ----------------------------------------------------------------------------------------------------------------


def png_bytes(image_hwc: np.ndarray) -> bytes:
    """A PNG of a uint8 HxWx3 image (PIL)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image_hwc, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def oord_pngs(folder: str, images_hwc: np.ndarray, names: list[str]) -> dict[str, bytes]:
    """{`folder/name`: PNG bytes}: the van den Oord layout (flat folders `train_64x64/`, `valid_64x64/`)."""
    return {f"{folder}/{name}": png_bytes(img) for name, img in zip(names, images_hwc, strict=True)}


def write_members(root: Path, members: dict[str, bytes]) -> None:
    """Write {relative name: bytes} below `root` (an extracted archive)."""
    for name, data in members.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def chrabaszcz_batch(images_chw: np.ndarray, labels: list[int], with_mean: bool, fmt: str) -> bytes:
    """One Chrabaszcz et al. batch: {data uint8 [N, 12288] channel-major, labels 1..1000, mean (train only)}."""
    n = len(images_chw)
    d = {"data": np.ascontiguousarray(images_chw.reshape(n, 12288), dtype=np.uint8), "labels": list(labels)}
    if with_mean:
        d["mean"] = images_chw.reshape(n, 12288).mean(axis=0)
    if fmt == "npz":
        buf = io.BytesIO()
        np.savez(buf, data=d["data"], labels=np.asarray(d["labels"]), **({"mean": d["mean"]} if with_mean else {}))
        return buf.getvalue()
    return pickle.dumps(d, protocol=4)


# ----------------------------------------------------------------------------------------------------------------
# Audio
# ----------------------------------------------------------------------------------------------------------------


def write_audio(path: Path, samples: np.ndarray, sample_rate: int, subtype: str | None = None) -> None:
    """Write float samples [frames] or [frames, channels] with soundfile (format from the suffix)."""
    import soundfile

    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, sample_rate, subtype=subtype)
