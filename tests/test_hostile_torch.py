"""CoreNet .pt / pytorch_model.bin from a stranger: the named tracebacks and memory blow-ups of the
mutation campaign are single MlxeffErrors naming the file, refused before anything is inflated."""

import io
import struct
import time
import zipfile
from collections import OrderedDict

import numpy as np
import pytest

from hostile import corenet_file, pickle_member, rezip, state_with, tiny_model
from mlxeff.convert import convert
from mlxeff.convert import torch_save as ts
from mlxeff.convert.torch_pickle import load_archive, read_state_dict, unpickle
from mlxeff.errors import MlxeffError


def refused(pt, tmp_path, match, **kw):
    out = tmp_path / "out"
    t = time.perf_counter()
    with pytest.raises(MlxeffError, match=match) as e:
        convert(pt, out, config=tiny_model().args, tokenizer=False, dtype="float32", progress=False, **kw)
    assert str(pt) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and time.perf_counter() - t < 20
    return str(e.value)


@pytest.fixture
def good(tmp_path):
    return corenet_file(tmp_path / "ckpt.pt")


def test_good_checkpoint_converts(good, tmp_path):
    convert(good, tmp_path / "out", config=tiny_model().args, tokenizer=False, dtype="float32", progress=False)


def test_zero_dim_embedding(tmp_path):
    def zero_d(state):
        state["token_embeddings.weight"] = ts.tensor(np.array(1.0, np.float32))
        return state
    pt = state_with(zero_d, tmp_path / "c.pt")
    refused(pt, tmp_path, r"token_embeddings.weight has shape \(\), expected 2 dimensions")
    with pytest.raises(MlxeffError, match="expected 2 dimensions"):  # inferring the size too
        convert(pt, tmp_path / "o2", tokenizer=False, progress=False)


@pytest.mark.parametrize("key,match", [
    (10 ** 5000, r"key <integer of 16610 bits> is not a string"),
    (7, r"key 7 is not a string"),
    (("a", "b"), r"key \('a', 'b'\) is not a string"),
    ("x" * 5000, r"is not a string of 1 to 1024 characters"),
    ("a\nb", r"unexpected weights: 'a\\nb'"),
], ids=["huge-int", "int", "tuple", "long-string", "newline"])
def test_keys_must_be_short_strings(tmp_path, key, match):
    def add(state):
        state[key] = next(iter(state.values()))
        return state
    refused(state_with(add, tmp_path / "c.pt"), tmp_path, match)


@pytest.mark.parametrize("method", [zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA])
def test_only_stored_and_deflate(good, tmp_path, method):
    pt = rezip(good, tmp_path / "re.pt", compress=method)
    refused(pt, tmp_path, rf"uses compression method {method}; only stored")


def test_deflated_checkpoint_is_read(good, tmp_path):
    pt = rezip(good, tmp_path / "re.pt", compress=zipfile.ZIP_DEFLATED)
    convert(pt, tmp_path / "o", config=tiny_model().args, tokenizer=False, dtype="float32", progress=False)


def _central_headers(data: bytes):
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        yield pos
        pos = data.find(b"PK\x01\x02", pos + 4)


def test_version_needed_and_name_encoding(good, tmp_path):
    data = bytearray(good.read_bytes())
    first = next(_central_headers(bytes(data)))
    bad = bytearray(data)
    bad[first + 6] = 0xFF  # version needed to extract: 25.5
    (tmp_path / "v.pt").write_bytes(bytes(bad))
    refused(tmp_path / "v.pt", tmp_path, r"truncated or corrupt zip: zip file version 25.5")
    bad = bytearray(data)
    flags = struct.unpack_from("<H", bad, first + 8)[0] | 0x800
    struct.pack_into("<H", bad, first + 8, flags)
    bad[first + 46] = 0xFF  # first byte of the name: not UTF-8
    (tmp_path / "n.pt").write_bytes(bytes(bad))
    refused(tmp_path / "n.pt", tmp_path, r"truncated or corrupt zip: 'utf-8' codec can't decode")


def _with_storage_member(tmp_path, payload: bytes, declared: int):
    """Replace the storage member by ``payload`` deflated; patch its declared size to ``declared``."""
    state = OrderedDict(w=ts.Tensor(ts.Storage("float32", declared // 4, lambda: None), (4,), (1,)))
    buf = io.BytesIO()
    ts._Pickler(buf, OrderedDict()).dump(state)
    out = tmp_path / "bomb.pt"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("bomb/data.pkl", buf.getvalue())
        z.writestr(zipfile.ZipInfo("bomb/data/0"), payload, compress_type=zipfile.ZIP_DEFLATED)
    data = bytearray(out.read_bytes())
    for pos in _central_headers(bytes(data)):
        (n,) = struct.unpack_from("<H", data, pos + 28)
        if data[pos + 46:pos + 46 + n] == b"bomb/data/0":
            struct.pack_into("<I", data, pos + 24, declared)
    out.write_bytes(bytes(data))
    return out


def test_zip_bomb_refused_before_inflating(tmp_path):
    zeros = b"\x00" * (64 << 20)  # 64 MiB of zeros deflate to 64 KiB: a 1000x ratio
    pt = _with_storage_member(tmp_path, zeros, len(zeros))
    _, refs = read_state_dict(pt)
    with pytest.raises(MlxeffError, match=r"declares 67,108,864 bytes from [\d,]+ compressed .*zip bomb") as e:
        refs["w"].read()
    assert str(pt) in str(e.value)
    # a small stream declared as 4 GB: refused from the directory entry, nothing inflated
    pt = _with_storage_member(tmp_path, b"\x00" * 4096, 4_000_000_000)
    _, refs = read_state_dict(pt)
    with pytest.raises(MlxeffError, match=r"declares 4,000,000,000 bytes"):
        refs["w"].read()


def test_memo_index_bounded():
    payload = b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 28) + b"."  # LONG_BINPUT 2**28
    t = time.perf_counter()
    with pytest.raises(MlxeffError, match=r"memo index 268435456 after 0 memoized objects"):
        unpickle(payload)
    with pytest.raises(MlxeffError, match=r"memo index"):
        unpickle(payload, scan=False)  # the bound applies without the global scan too
    assert time.perf_counter() - t < 1


def test_pickle_lengths_past_the_data_refused():
    for payload in (b"\x80\x02\x8e" + struct.pack("<Q", 2 ** 40) + b"abc.",  # BINBYTES8 of 1 TB
                    b"\x80\x02X" + struct.pack("<I", 2 ** 31) + b"abc."):     # BINUNICODE of 2 GB
        with pytest.raises(MlxeffError, match="corrupt pickle"):
            unpickle(payload)


def test_huge_sizes_in_the_pickle(tmp_path):
    s = ts.Storage("float32", 4, np.zeros(4, np.float32))
    pt = ts.save(OrderedDict(w=ts.Tensor(s, (2 ** 70,), (1,))), tmp_path / "h.pt")
    with pytest.raises(MlxeffError, match=r"tensor size must be a tuple of at most 64 integers"):
        load_archive(pt)


def test_integer_weights_name_the_file(tmp_path):
    def to_uint8(state):
        k = "layers.0.attn_norm.weight"
        state[k] = ts.tensor(np.ones(64, np.uint8))
        return state
    refused(state_with(to_uint8, tmp_path / "c.pt"), tmp_path, r"layers.0.attn_norm.weight: weights must be floating point, got uint8")


def test_storage_redeclared_with_another_type(good, tmp_path):
    def redeclare(name, data):
        if name.endswith("data.pkl"):
            assert b"FloatStorage" in data
            return data.replace(b"torch\nFloatStorage\n", b"torch\nHalfStorage\n")
        return data
    pt = rezip(good, tmp_path / "half.pt", member_fn=redeclare)
    refused(pt, tmp_path, r"holds [\d,]+ bytes, expected [\d,]+")


def test_hf_bin_checkpoint_damaged(tmp_path):
    from conftest import write_hf_openelm

    d = write_hf_openelm(tiny_model(), tmp_path / "hf", fmt="bin")
    member = pickle_member(d / "pytorch_model.bin")
    rezip(d / "pytorch_model.bin", tmp_path / "x.bin",
          member_fn=lambda n, b: b[:len(b) // 2] if n == member else b)
    (tmp_path / "x.bin").replace(d / "pytorch_model.bin")
    with pytest.raises(MlxeffError, match="corrupt pickle") as e:
        convert(d, tmp_path / "out", tokenizer=False, progress=False)
    assert str(d / "pytorch_model.bin") in str(e.value)


def test_crc_checked_on_deflated_members(good, tmp_path):
    pt = rezip(good, tmp_path / "re.pt", compress=zipfile.ZIP_DEFLATED)
    data = bytearray(pt.read_bytes())
    for pos in _central_headers(bytes(data)):
        (n,) = struct.unpack_from("<H", data, pos + 28)
        if data[pos + 46:pos + 46 + n].endswith(b"data/0"):
            struct.pack_into("<I", data, pos + 16, struct.unpack_from("<I", data, pos + 16)[0] ^ 1)
    pt.write_bytes(bytes(data))
    refused(pt, tmp_path, r"data/0 is corrupt \(CRC mismatch\)")


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero"])
def test_special_files_refused_unopened(tmp_path, kind):
    import os

    pt = tmp_path / "c.pt"
    os.mkfifo(pt) if kind == "fifo" else os.symlink(kind, pt)
    with pytest.raises(MlxeffError, match="expected a regular file"):
        read_state_dict(pt)
    with pytest.raises(MlxeffError, match="not a regular file or a directory"):
        convert(pt, tmp_path / "out", config=tiny_model().args, tokenizer=False, progress=False)
