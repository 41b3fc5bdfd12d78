"""Files of tensor trains: :func:`save` and :func:`load`.

Two containers, chosen by the file name:

- ``*.npz`` - a NumPy archive, readable without ttmanifold or torch: arrays ``core_0``,
  ``core_1``, ... (shape ``(r_{k-1}, n_k, r_k)``) and ``meta`` (a JSON string with the
  format name, version, shape, ranks and dtype);
- any other name - ``torch.save`` of a dict holding the same fields and the cores as
  tensors, read back with ``torch.load(weights_only=True)`` (no code is unpickled).

Both store the cores exactly (bit for bit, in their dtype).
"""
from __future__ import annotations

import json
import os
import threading
import zipfile
from typing import Optional

import numpy as np
import torch

from ._checks import check_finite, check_float_dtype
from .tt import TT

__all__ = ["save", "load", "FORMAT"]

FORMAT = "ttmanifold.TT"
VERSION = 2  # 2: batches of TTs (``batch_shape``); a single TT is still written as 1

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _as_tt(x) -> TT:
    if isinstance(x, TT):
        return x
    manifold = getattr(x, "manifold", None)
    if isinstance(x, torch.Tensor) and manifold is not None and hasattr(manifold, "to_tt"):
        return manifold.to_tt(x)  # a packed point carrying its FixedTTRank
    raise TypeError(f"x: expected a TT (or a ManifoldTensor of FixedTTRank), got "
                    f"{type(x).__name__}; for a packed point p use M.to_tt(p)")


def _as_path(path) -> str:
    """``path`` as a str (bytes decoded: a bytes path failed as "Can't mix strings and bytes")."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path: expected a file name (str, bytes or path-like), got "
                        f"{type(path).__name__}") from None


def save(x, path) -> None:
    """Write a tensor train to ``path`` (``.npz``: a NumPy archive; otherwise a torch file).

    Args:
        x: a :class:`~ttmanifold.TT` (or a batch of TTs, cores ``(*batch, r, n, r')``,
            read back as the same batch), or a packed point carrying its manifold (a
            ``geoopt.ManifoldTensor`` of :class:`~ttmanifold.FixedTTRank`).
        path: the file (str or path-like); an existing file is replaced (atomically: the
            data go to a temporary file in the same directory first).

    Returns None. Raises ``ValueError`` naming ``x`` for non-finite cores (:func:`load`
    could not read them back) or a TT on the meta device, ``IsADirectoryError`` naming
    ``path`` for a directory.
    Cost: O(number of TT parameters).
    """
    tt = _as_tt(x)
    if tt.device.type == "meta":  # (failed inside torch, copying the cores to the CPU)
        raise ValueError("x: a TT on the meta device holds no values to save")
    for k, c in enumerate(tt.cores):
        check_finite(c.detach(), f"x: core {k}")
    path = _as_path(path)
    # (before any work: a directory failed at the final rename, naming the temporary file)
    if not path or os.path.isdir(path):
        raise IsADirectoryError(f"path: {path!r} is a directory, not a file name")
    cores = [c.detach().cpu().contiguous() for c in tt.cores]
    dtype = str(cores[0].dtype).replace("torch.", "")
    meta = {"format": FORMAT, "version": 1, "shape": list(tt.shape),
            "ranks": list(tt.ranks), "dtype": dtype}
    if tt.batch_shape:  # (cores (*batch, r, n, r'); readers of version 1 refuse the file)
        meta.update(version=2, batch_shape=list(tt.batch_shape))
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"path: the directory {directory!r} does not exist")
    # one temporary name per process and thread: two threads saving the same path would
    # otherwise write into one file and rename it under each other
    tmp = os.path.join(directory,
                       f".{os.path.basename(path)}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        # our own open: torch.save(name) failed as "[enforce fail at inline_container.cc]
        # open file failed", naming no file
        with open(tmp, "wb") as f:
            if path.endswith(".npz"):
                arrays = {f"core_{k}": c.numpy() for k, c in enumerate(cores)}
                np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            else:
                torch.save(dict(meta, cores=cores), f)
        os.replace(tmp, path)
    except OSError as exc:
        msg = f"path: cannot write {path!r} ({exc.strerror or exc})"
        raise (OSError(exc.errno, msg) if exc.errno is not None else OSError(msg)) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path, *, dtype: Optional[torch.dtype] = None, device=None) -> TT:
    """Read a tensor train written by :func:`save`.

    Args:
        path: the file (``.npz`` or a torch file, by its name).
        dtype: cast the cores (default: the stored dtype).
        device: move the cores (default: CPU).

    Returns a :class:`~ttmanifold.TT`. Raises ``FileNotFoundError`` for a missing file,
    ``ValueError`` naming ``path`` for a file that is not a saved TT, is damaged or whose
    cores do not chain (shape, ranks), ``TypeError`` naming ``dtype`` for a dtype other than
    float32/float64 and ``ValueError`` naming ``device`` for a string that is no device.
    Cost: O(number of TT parameters).
    """
    # the arguments first (a string dtype failed as an 'invalid device string', after the read)
    if dtype is not None:
        check_float_dtype(dtype, "dtype")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"device: not a torch device: {device!r} ({exc})") from None
    path = _as_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file {path!r}")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                n = len(meta.get("shape", []))
                cores = [torch.from_numpy(z[f"core_{k}"].copy()) for k in range(n)]
        else:
            # torch.load does not check the zip records' CRC-32 (torch.save writes them): a
            # flipped byte in a core would load as silently wrong numbers
            if zipfile.is_zipfile(path):
                with zipfile.ZipFile(path) as zf:
                    bad = zf.testzip()
                if bad is not None:
                    raise ValueError(f"record {bad!r} fails its CRC-32 check (damaged file)")
            data = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(data, dict):
                raise ValueError("not a dict")
            meta = {k: v for k, v in data.items() if k != "cores"}
            cores = list(data.get("cores", []))
    except (KeyError, ValueError, OSError, RuntimeError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"path: {path!r} is not a tensor train saved by ttmanifold.save "
                         f"({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # noqa: BLE001  (unpickling errors of foreign files)
        raise ValueError(f"path: {path!r} is not a tensor train saved by ttmanifold.save "
                         f"({type(exc).__name__})") from exc
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path!r} is not a tensor train saved by ttmanifold.save "
                         f"(format {meta.get('format')!r})")
    try:  # (a damaged record raised a bare KeyError or TypeError without the file's name)
        version = int(meta.get("version", 0))
        if version <= VERSION:
            shape = [int(n) for n in meta["shape"]]
            ranks = [int(r) for r in meta["ranks"]]
            batch = tuple(int(b) for b in meta.get("batch_shape", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"path: {path!r}: damaged metadata ({type(exc).__name__}: {exc})") from exc
    if version > VERSION:
        raise ValueError(f"path: {path!r} has format version {meta['version']}; this "
                         f"ttmanifold reads up to {VERSION} (upgrade ttmanifold)")
    ok = len(cores) == len(shape) and len(ranks) == len(shape) + 1 and all(
        isinstance(c, torch.Tensor)
        and tuple(c.shape) == batch + (ranks[k], shape[k], ranks[k + 1])
        for k, c in enumerate(cores))
    if not ok:
        raise ValueError(f"path: {path!r}: the cores do not match the recorded shape "
                         f"{tuple(shape)}, ranks {tuple(ranks)} and batch shape {batch} "
                         f"(damaged file?)")
    stored = _DTYPES.get(meta.get("dtype"))
    target = dtype if dtype is not None else stored
    if target is not None:
        cores = [c.to(target) for c in cores]
    if device is not None:
        cores = [c.to(device) for c in cores]
    return TT(cores)

