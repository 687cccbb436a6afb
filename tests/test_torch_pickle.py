"""The torch-free reader of torch.save files: exact data, layouts, and refusal of unsafe pickles."""

import io
import os
import pickle
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from mlxeff.convert import torch_save as ts
from mlxeff.convert.torch_pickle import (
    SAFE_GLOBALS, UnsafePickle, load_archive, read_state_dict, scan_globals, unpickle,
)
from mlxeff.errors import MlxeffError

RNG = np.random.default_rng(0)


def _roundtrip(tmp_path, state, **kw):
    path = ts.save(state, tmp_path / "ckpt.pt", **kw)
    _, refs = read_state_dict(path)
    return {k: r.read() for k, r in refs.items()}, refs


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64", "int64", "int32", "uint8", "bool"])
def test_roundtrip_dtypes(tmp_path, dtype):
    a = (RNG.standard_normal((5, 7)) * 10).astype(dtype)
    got, refs = _roundtrip(tmp_path, OrderedDict(w=ts.tensor(a)))
    assert refs["w"].dtype == dtype and refs["w"].shape == (5, 7)
    assert got["w"].dtype == a.dtype and np.array_equal(got["w"], a)


def test_bfloat16_bits_exact(tmp_path):
    a = RNG.standard_normal((3, 4)).astype(np.float32)
    b = ts.bf16_bits(a)
    got, refs = _roundtrip(tmp_path, OrderedDict(w=ts.tensor(b, "bfloat16")))
    assert refs["w"].dtype == "bfloat16" and np.array_equal(got["w"], b)
    # the bit pattern is bf16: widening it to fp32 gives the rounded value within bf16 precision
    widened = (got["w"].astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_allclose(widened, a, rtol=2**-8)


def test_strided_offset_and_shared_storages(tmp_path):
    base = RNG.standard_normal(60).astype(np.float32)
    s = ts.Storage("float32", 60, base)
    state = OrderedDict()
    state["transposed"] = ts.Tensor(s, (4, 5), (1, 4))            # base[:20] viewed as (5,4).T
    state["offset"] = ts.Tensor(s, (2, 3), (3, 1), offset=20)      # contiguous slice
    state["gapped"] = ts.Tensor(s, (3, 2), (7, 2), offset=30)      # every other element, row gaps
    state["broadcast"] = ts.Tensor(s, (3, 4), (0, 1), offset=50)   # a stride-0 (expanded) view
    got, _ = _roundtrip(tmp_path, state)
    assert np.array_equal(got["transposed"], base[:20].reshape(5, 4).T)
    assert np.array_equal(got["offset"], base[20:26].reshape(2, 3))
    assert np.array_equal(got["gapped"], np.array([[base[30 + 7 * i + 2 * j] for j in range(2)] for i in range(3)]))
    assert np.array_equal(got["broadcast"], np.broadcast_to(base[50:54], (3, 4)))


def test_big_endian_file(tmp_path):
    a = RNG.standard_normal((3, 3)).astype(np.float32)
    got, _ = _roundtrip(tmp_path, OrderedDict(w=ts.tensor(a)), byteorder="big")
    assert np.array_equal(got["w"], a)


def test_training_checkpoint_with_optimizer_and_numpy_scalars(tmp_path):
    a = RNG.standard_normal((2, 2)).astype(np.float32)
    w = ts.tensor(a)
    obj = {"model_state_dict": OrderedDict(w=w), "best_metric": np.float64(1.25), "epoch": 3,
           "blob": b"\x00\xffbytes", "optim_state_dict": {"state": {0: {"exp_avg": ts.Tensor(w.storage, (2, 2))}},
                                                           "param_groups": [{"betas": (0.9, 0.95)}]}}
    path = ts.save(obj, tmp_path / "train.pt")
    archive, refs = read_state_dict(path)
    assert archive.obj["best_metric"] == 1.25 and archive.obj["blob"] == b"\x00\xffbytes"
    assert list(refs) == ["w"] and np.array_equal(refs["w"].read(), a)


def test_archive_prefix_is_the_file_stem(tmp_path):
    path = ts.save(OrderedDict(w=ts.tensor(np.ones(3, np.float32))), tmp_path / "checkpoint_ema_best.pt")
    names = zipfile.ZipFile(path).namelist()
    assert "checkpoint_ema_best/data.pkl" in names and "checkpoint_ema_best/byteorder" in names
    assert load_archive(path).prefix == "checkpoint_ema_best/"


# --- refusing code execution --------------------------------------------------------------

class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _zip_with_pickle(path, data: bytes):
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("archive/data.pkl", data)
        zf.writestr("archive/version", "3\n")
    return path


@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_reduce_is_refused_before_it_runs(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"model_state_dict": {"w": _Evil(marker)}}, protocol=protocol)
    # sanity: a plain unpickler would run it
    assert not marker.exists()
    path = _zip_with_pickle(tmp_path / "evil.pt", payload)
    with pytest.raises(UnsafePickle, match=r"refusing to load: the pickle calls (posix|nt)\.system"):
        load_archive(path)
    assert not marker.exists()


def test_runtime_check_catches_what_the_scan_cannot_see(tmp_path):
    # The scan is skipped: find_class alone must refuse (names built on the stack, memo tricks).
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker), protocol=4)
    with pytest.raises(UnsafePickle):
        unpickle(payload, scan=False)
    assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("builtins", "getattr"), ("subprocess", "Popen"),
                                         ("torch", "load"), ("numpy", "load"), ("collections", "defaultdict")])
def test_other_globals_refused(module, name):
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x00x\x85R."
    with pytest.raises(UnsafePickle, match=f"{module}.{name}"):
        scan_globals(payload)
    with pytest.raises(UnsafePickle):
        unpickle(payload, scan=False)


def test_allow_list_holds_no_real_callables_from_torch_or_os():
    for (module, _), obj in SAFE_GLOBALS.items():
        assert not getattr(obj, "__module__", "").startswith(("torch", "os", "posix", "subprocess"))


def test_tensor_outside_its_storage_refused(tmp_path):
    s = ts.Storage("float32", 10, np.zeros(10, np.float32))
    path = ts.save(OrderedDict(w=ts.Tensor(s, (4, 3), (3, 1))), tmp_path / "oob.pt")
    with pytest.raises(MlxeffError, match="reaches element 11 of a storage of 10"):
        load_archive(path)


# --- damaged files ------------------------------------------------------------------------

def _good(tmp_path):
    return ts.save(OrderedDict(w=ts.tensor(RNG.standard_normal((64, 64)).astype(np.float32))), tmp_path / "good.pt")


def test_truncated_zip(tmp_path):
    path = _good(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(MlxeffError, match="truncated or corrupt zip"):
        load_archive(path)


def test_corrupt_storage_detected_by_crc(tmp_path):
    path = _good(tmp_path)
    data = bytearray(path.read_bytes())
    info = zipfile.ZipFile(io.BytesIO(bytes(data))).getinfo("good/data/0")
    data[info.header_offset + 30 + len(info.filename) + len(info.extra) + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    _, refs = read_state_dict(path)
    with pytest.raises(MlxeffError, match="CRC mismatch"):
        refs["w"].read()


def test_missing_storage(tmp_path):
    src = _good(tmp_path)
    dst = tmp_path / "nostorage.pt"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            if not item.filename.endswith("data/0"):
                zout.writestr(item, zin.read(item.filename))
    _, refs = read_state_dict(dst)
    with pytest.raises(MlxeffError, match="missing storage"):
        refs["w"].read()


def test_legacy_and_non_torch_files(tmp_path):
    legacy = tmp_path / "legacy.pt"
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"rest")
    with pytest.raises(MlxeffError, match="legacy torch serialization"):
        load_archive(legacy)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"hello world")
    with pytest.raises(MlxeffError, match="not a zip archive"):
        load_archive(junk)
    script = tmp_path / "script.pt"
    with zipfile.ZipFile(script, "w") as zf:
        zf.writestr("m/data.pkl", pickle.dumps({}, protocol=2))
        zf.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(MlxeffError, match="TorchScript"):
        load_archive(script)


def test_truncated_pickle(tmp_path):
    payload = pickle.dumps(OrderedDict(a=1, b=2), protocol=2)[:-6]
    path = _zip_with_pickle(tmp_path / "cut.pt", payload)
    with pytest.raises(MlxeffError, match="corrupt pickle"):
        load_archive(path)


def test_no_state_dict(tmp_path):
    path = ts.save({"epoch": 1, "note": "no tensors"}, tmp_path / "empty.pt")
    with pytest.raises(MlxeffError, match="no state dict of tensors"):
        read_state_dict(path)


def _s(text):
    return b"X" + len(text).to_bytes(4, "little") + text.encode()


STATE = b"}" + _s("numel") + b"J\x00\x00\x00\x7fs"  # {'numel': 2**31 - 2**24}


@pytest.mark.parametrize("target", [
    b"ctorch._utils\n_rebuild_tensor_v2\n",                                   # an allow-listed function
    b"(" + _s("storage") + b"ctorch\nFloatStorage\n" + _s("0") + _s("cpu") + b"K\x04tQ",  # a storage
    b"ctorch\nFloatStorage\n",                                                # a storage type
])
def test_build_cannot_rewrite_allowed_objects(target):
    with pytest.raises(MlxeffError, match="corrupt pickle"):
        unpickle(b"\x80\x02" + target + STATE + b"b.")
