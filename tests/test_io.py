"""ttmanifold.save / ttmanifold.load: round trips are exact (every dtype, both containers),
packed points carrying their manifold are accepted, foreign or damaged files raise
ValueError naming the path."""
import json
import os

import numpy as np
import pytest
import torch

import ttmanifold as tm


@pytest.mark.parametrize("name", ["x.npz", "x.tt", "x.pt"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_round_trip_is_exact(tmp_path, name, dtype):
    x = tm.TT.random((3, 4, 5), 2, dtype=torch.float64)
    x = tm.TT([c.to(dtype) for c in x.cores])
    tm.save(x, tmp_path / name)
    y = tm.load(tmp_path / name)
    assert y.dtype == dtype and y.shape == x.shape and y.ranks == x.ranks
    for a, b in zip(x.cores, y.cores):
        assert torch.equal(a, b)
    # and the dense tensors agree (independent of the cores' gauge)
    assert torch.equal(x.full(), y.full())


@pytest.mark.parametrize("name", ["b.npz", "b.pt"])
def test_a_batch_of_tts_round_trips(tmp_path, name):
    # (save wrote it, load refused it as a damaged file)
    x = tm.TT.random((3, 4, 2), 2, dtype=torch.float64, batch=(2, 3))
    tm.save(x, tmp_path / name)
    y = tm.load(tmp_path / name)
    assert y.batch_shape == (2, 3) and y.shape == x.shape and y.ranks == x.ranks
    assert torch.equal(y.full(), x.full())
    if name.endswith(".npz"):  # a single TT's file is unchanged (version 1)
        tm.save(x[0, 0], tmp_path / "one.npz")
        meta = json.loads(str(np.load(tmp_path / "one.npz")["meta"]))
        assert meta["version"] == 1 and "batch_shape" not in meta


def test_npz_is_readable_by_numpy_alone(tmp_path):
    x = tm.TT.random((3, 4, 5, 2), (1, 2, 3, 2, 1), dtype=torch.float64)
    tm.save(x, tmp_path / "a.npz")
    z = np.load(tmp_path / "a.npz", allow_pickle=False)
    meta = json.loads(str(z["meta"]))
    assert meta["shape"] == [3, 4, 5, 2] and meta["ranks"] == [1, 2, 3, 2, 1]
    dense = np.einsum("aib,bjc,ckd,dle->ijkl", *[z[f"core_{k}"] for k in range(4)])
    np.testing.assert_allclose(dense, x.full().numpy(), rtol=1e-13, atol=1e-15)

def test_packed_point_dtype_device_and_overwrite(tmp_path):
    M = tm.FixedTTRank((4, 5, 6), 3)
    p = M.random(dtype=torch.float64)
    tm.save(p, tmp_path / "p.pt")
    y = tm.load(tmp_path / "p.pt", dtype=torch.float32, device="cpu")
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.full().double(), M.to_tt(p).full(), rtol=1e-6, atol=1e-6)
    tm.save(tm.TT.random((2, 2), 1, dtype=torch.float64), tmp_path / "p.pt")  # replaced
    assert tm.load(tmp_path / "p.pt").shape == (2, 2)
    assert not [f for f in tmp_path.iterdir() if "tmp" in f.name]


def test_errors(tmp_path):
    with pytest.raises(TypeError, match="x: expected a TT"):
        tm.save(torch.zeros(3), tmp_path / "a.pt")
    with pytest.raises(FileNotFoundError, match="directory"):
        tm.save(tm.TT.random((2, 2), 1), tmp_path / "nodir" / "a.pt")
    for name in ("m.pt", "m.npz"):  # failed inside torch, copying the cores to the CPU
        with pytest.raises(ValueError, match="x: a TT on the meta device holds no values"):
            tm.save(tm.TT.random((2, 2), 1, device="meta"), tmp_path / name)
    with pytest.raises(FileNotFoundError, match="no such file"):
        tm.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="junk.npz"):
        tm.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="other.npz"):
        tm.load(tmp_path / "other.npz")
    torch.save({"format": "ttmanifold.TT", "version": 1, "shape": [2, 3], "ranks": [1, 2, 1],
                "dtype": "float64", "cores": [torch.zeros(1, 2, 2), torch.zeros(2, 4, 1)]},
               tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="do not match"):
        tm.load(tmp_path / "bad.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt"):
        tm.load(tmp_path / "list.pt")


def test_a_damaged_torch_file_is_refused_not_read_as_other_numbers(tmp_path):
    # (torch.load skips the zip CRC: a flipped byte in a core loaded as a wrong value)
    x = tm.TT.random((3, 4, 5), 2, dtype=torch.float64)
    tm.save(x, tmp_path / "x.pt")
    data = bytearray((tmp_path / "x.pt").read_bytes())
    off = bytes(data).find(x.cores[1].numpy().tobytes())
    assert off > 0
    data[off + 3] ^= 0x55
    (tmp_path / "bad.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad.pt.*CRC"):
        tm.load(tmp_path / "bad.pt")


@pytest.mark.parametrize("change", [{"shape": None}, {"ranks": "abc"}, {"version": "2.1"},
                                    {"version": None}, {"batch_shape": 3}, {"shape": ["a"]}])
def test_damaged_metadata_is_a_value_error_naming_the_file(tmp_path, change):
    # (a missing or malformed field raised a bare KeyError/TypeError without the file's name)
    x = tm.TT.random((3, 4), 2, dtype=torch.float64)
    meta = {"format": "ttmanifold.TT", "version": 1, "shape": [3, 4], "ranks": [1, 2, 1],
            "dtype": "float64"}
    meta.update(change)
    torch.save(dict(meta, cores=list(x.cores)), tmp_path / "m.pt")
    with pytest.raises(ValueError, match="m.pt"):
        tm.load(tmp_path / "m.pt")
    del meta["ranks"]
    with open(tmp_path / "m.npz", "wb") as f:
        np.savez(f, meta=np.array(json.dumps(meta)), core_0=x.cores[0].numpy(),
                 core_1=x.cores[1].numpy())
    with pytest.raises(ValueError, match="m.npz"):
        tm.load(tmp_path / "m.npz")


def test_load_checks_dtype_and_device_first(tmp_path):
    # (dtype="float32" failed after the read as torch's "Invalid device string")
    tm.save(tm.TT.random((3, 4), 2, dtype=torch.float64), tmp_path / "x.pt")
    with pytest.raises(TypeError, match="dtype"):
        tm.load(tmp_path / "x.pt", dtype="float32")
    with pytest.raises(TypeError, match="dtype"):
        tm.load(tmp_path / "missing.pt", dtype=torch.int64)
    with pytest.raises(ValueError, match="device"):
        tm.load(tmp_path / "x.pt", device="bogus")
    assert tm.load(tmp_path / "x.pt", dtype=torch.float32, device="cpu").dtype == torch.float32


@pytest.mark.parametrize("name", ["d.npz", "d.pt", ""])
def test_save_to_a_directory_names_the_argument(tmp_path, name, monkeypatch):
    # (failed at the final rename with the temporary file's name; "" wrote a hidden
    # temporary file into the parent of the working directory first)
    monkeypatch.chdir(tmp_path)
    if name:
        (tmp_path / name).mkdir()
    with pytest.raises(IsADirectoryError, match="path: .* is a directory"):
        tm.save(tm.TT.random((3, 4), 2), name)
    assert not [f for f in tmp_path.parent.iterdir() if ".tmp" in f.name]


def test_save_into_an_unwritable_directory_names_the_path(read_only_dir):
    # (a torch file failed as "[enforce fail at inline_container.cc] open file failed",
    # naming no file)
    x = tm.TT.random((3, 4), 2)
    for name in ("a.pt", "a.npz"):
        with pytest.raises(OSError, match=f"path: cannot write .*{name}"):
            tm.save(x, read_only_dir / name)


def test_bytes_and_wrong_type_paths(tmp_path):
    # (a bytes path failed as "Can't mix strings and bytes"; None named no argument)
    x = tm.TT.random((3, 4), 2, dtype=torch.float64)
    name = bytes(tmp_path / "b.npz")
    tm.save(x, name)
    assert torch.equal(tm.load(name).full(), x.full())
    for f in (lambda: tm.save(x, None), lambda: tm.load(3)):
        with pytest.raises(TypeError, match="^path: expected a file name"):
            f()


def test_threads_saving_one_path_do_not_collide(tmp_path):
    """Two threads saving to the same path each write their own temporary file: with one
    name per process, one thread truncated or renamed the other's file (a failed save, or a
    torn file on disk)."""
    import threading

    x = tm.TT.random((30, 30, 30), 12, dtype=torch.float64,
                     generator=torch.Generator().manual_seed(3))
    y = x * 2.0
    path = str(tmp_path / "t.pt")
    errors = []

    def worker(t):
        try:
            for _ in range(25):
                tm.save(t, path)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (x, y)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    z = tm.load(path)
    assert any(torch.allclose(z.full(), t.full(), rtol=0, atol=0) for t in (x, y))
    assert [f for f in os.listdir(tmp_path) if f != "t.pt"] == []


@pytest.mark.parametrize("name", ["x.npz", "x.pt"])
def test_save_interrupted_midway_keeps_the_old_file_and_no_temporary(tmp_path, monkeypatch, name):
    """Ctrl-C (KeyboardInterrupt) while the data are being written: the file saved before is
    intact and no half-written or temporary file is left in the directory."""
    x = tm.TT.random((3, 4, 5), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tm.save(x, tmp_path / name)
    before = (tmp_path / name).read_bytes()
    y = tm.TT.random((3, 4, 5), 3, dtype=torch.float64)

    def interrupted(*args, **kwargs):  # np.savez(f, ...) / torch.save(obj, f)
        args[-1 if len(args) > 1 else 0].write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tm.save(y, tmp_path / name)
    assert (tmp_path / name).read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [name]
    monkeypatch.undo()
    z = tm.load(tmp_path / name)
    assert torch.equal(z.full(), x.full())
