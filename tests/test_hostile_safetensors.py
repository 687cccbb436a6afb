"""safetensors headers and data from a stranger: every corruption class mx.load accepts silently
is refused before mx.load runs, naming the file; the index file and shards the same."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest

import mlxeff
from hostile import edit_header, first_tensor, logits_finite, mlxeff_dir, read_st, write_st
from mlxeff.errors import MlxeffError
from mlxeff.safetensors_check import read_header


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("st")
    return {"f32": mlxeff_dir(root / "f32"), "f16": mlxeff_dir(root / "f16", dtype=mx.float16)}


@pytest.fixture
def f32(bases, tmp_path):
    shutil.copytree(bases["f32"], tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def f16(bases, tmp_path):
    shutil.copytree(bases["f16"], tmp_path / "m")
    return tmp_path / "m"


def refused(d, match, file=None):
    with pytest.raises(MlxeffError, match=match) as e:
        mlxeff.load(d)
    assert str(file or d / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_mx_load_alone_accepts_what_is_refused_here(f32):
    # the reason for the validator: a 33-bit dimension loads as its low 32 bits
    st = f32 / "model.safetensors"

    def widen(h):
        name = first_tensor(h, "F32")
        h[name]["shape"] = [2 ** 32 + h[name]["shape"][0]] + h[name]["shape"][1:]
        return h
    edit_header(st, widen)
    assert all(d < 2 ** 32 for a in mx.load(str(st)).values() for d in a.shape)
    refused(f32, r"shape \[4294967\d+.*is not a list of at most 16 integers in \[0, 2\^31\)")


def _shape(value):
    def fn(h):
        h[first_tensor(h)]["shape"] = value
        return h
    return fn


def _offsets(fn_off):
    def fn(h):
        name = first_tensor(h)
        h[name]["data_offsets"] = fn_off(h[name]["data_offsets"], h)
        return h
    return fn


@pytest.mark.parametrize("fn,match", [
    (_shape([2 ** 31]), r"in \[0, 2\^31\)"),
    (_shape([4294967488]), r"in \[0, 2\^31\)"),
    (_shape([64.0, 64]), r"is not a list of at most 16 integers"),
    (_shape([63.5, 64]), r"is not a list of at most 16 integers"),
    (_shape([-1, 64]), r"is not a list"),
    (_shape([True, 64]), r"is not a list"),
    (_shape("64"), r"is not a list"),
    (_offsets(lambda o, h: [float(o[0]), o[1]]), r"data_offsets must be two non-negative integers"),
    (_offsets(lambda o, h: [o[0], o[1] + 0.5]), r"data_offsets must be two non-negative integers"),
    (_offsets(lambda o, h: [o[0] + 4, o[1] + 4]), r"leaves a gap|overlaps"),
    (_offsets(lambda o, h: [o[1], o[0]]), r"hold -?\d+ bytes"),
    (_offsets(lambda o, h: [o[0], o[1] - 4]), r"hold \d+ bytes, F32 .* needs"),
])
def test_dimensions_and_offsets_exact(f32, fn, match):
    edit_header(f32 / "model.safetensors", fn)
    refused(f32, match)


def test_overlapping_tensors(f32):
    def overlap(h):
        names = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        (_, a), (_, b) = names[0], names[1]
        size = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] + size]
        return h
    edit_header(f32 / "model.safetensors", overlap)
    refused(f32, r"overlaps the previous tensor|leaves a gap")


@pytest.mark.parametrize("code", ["BF16", "I16", "U16"])
def test_another_two_byte_dtype_than_stored(f16, code):
    def swap(h):
        name = next(k for k, v in h.items() if k != "__metadata__" and v["dtype"] == "F16" and v["shape"][0] > 1)
        h[name]["dtype"] = code
        return h
    edit_header(f16 / "model.safetensors", swap)
    refused(f16, r"several dtypes \(bfloat16, float16\)" if code == "BF16" else rf"has dtype {code.lower().replace('i', 'int').replace('u', 'uint')}, the model needs")


def test_unknown_and_unsupported_dtypes(f32):
    edit_header(f32 / "model.safetensors", lambda h: {**h, first_tensor(h): {**h[first_tensor(h)], "dtype": "F8_E4M3"}})
    refused(f32, r"unknown dtype 'F8_E4M3'")


def test_duplicate_keys_bom_and_leading_blank(f32):
    st = f32 / "model.safetensors"
    header, data = read_st(st)
    h = json.loads(header)
    name = first_tensor(h)
    dup = b'{"' + name.encode() + b'":' + json.dumps(h[name]).encode() + b"," + header[1:]
    write_st(st, dup, data)
    refused(f32, r"duplicate key")
    write_st(st, b"\xef\xbb\xbf" + header, data)
    refused(f32, r"does not start with '\{'")
    write_st(st, b" " + header, data)
    refused(f32, r"does not start with '\{'")
    write_st(st, header + b"    ", data)  # trailing padding is allowed by the format
    mlxeff.load(f32)


@pytest.mark.parametrize("mutate,match", [
    (lambda hd, d: (hd, d[:-1]), r"truncated safetensors file"),
    (lambda hd, d: (hd, d + b"\x00" * 8), r"8 bytes after the last tensor"),
    (lambda hd, d: (hd[:-2], d), r"invalid safetensors header"),
    (lambda hd, d: (b"[" + hd[1:-1] + b"]", d), r"does not start"),
    (lambda hd, d: (hd.replace(b'"dtype"', b'"dtype":"F32","extra"', 1), d), r"expected dtype, shape and data_offsets"),
    (lambda hd, d: (hd.replace(b'"format":"mlx"', b'"format":7'), d), r"__metadata__ must map strings"),
])
def test_structure_and_size(f32, mutate, match):
    st = f32 / "model.safetensors"
    write_st(st, *mutate(*read_st(st)))
    refused(f32, match)


def test_header_length_field(f32):
    st = f32 / "model.safetensors"
    header, data = read_st(st)
    write_st(st, header, data, length=2 ** 63)
    refused(f32, r"header of [\d,]+ bytes exceeds the limit")
    write_st(st, header, data, length=len(header) + len(data) + 1)
    refused(f32, r"truncated or corrupt safetensors file \(header of")
    st.write_bytes(b"\x01\x02")
    refused(f32, r"truncated or corrupt safetensors file \(2 bytes, no header\)")


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf, 3e7])
def test_non_finite_or_huge_data_refused(f32, value):
    st = f32 / "model.safetensors"
    header, data = read_st(st)
    h = json.loads(header)
    name = "transformer.layers.1.ffn.proj_2.weight"
    at = h[name]["data_offsets"][0] + 4 * 7
    data = data[:at] + np.float32(value).tobytes() + data[at + 4:]
    write_st(st, header, data)
    refused(f32, rf"{name} holds NaN, infinite or out-of-range values")


@pytest.mark.parametrize("check", ["mlx", "numpy"])
def test_value_limit_boundaries(check, monkeypatch):
    from mlxeff import values

    monkeypatch.setattr(values, "CHUNK", 3)  # several chunks per array on the NumPy path

    def ok(vals, dtype):
        a = mx.array(vals, dtype=mx.float32).astype(dtype)
        mx.eval(a)
        return values.within_value_limit(a).item() if check == "mlx" else values._within_limit_cpu(a)

    for dtype in (mx.float16, mx.bfloat16, mx.float32):
        assert ok([0.0, -0.0, 1.5, -2.0 ** 15, 7.0, -65504.0, 3.0], dtype)
        for bad in (np.nan, -np.nan, np.inf, -np.inf):
            assert not ok([1.0, 2.0, 3.0, 4.0, bad], dtype), (dtype, bad)
    for dtype in (mx.bfloat16, mx.float32):
        assert ok([2.0 ** 20, -2.0 ** 20, 1.0, 2.0], dtype)
        assert not ok([1.0, 2.0, 3.0, 2.0 ** 21], dtype)
        assert not ok([1.0, 2.0, 3.0, -2.0 ** 21], dtype)


def _shared_shard_tensor(weight_map):
    files = list(weight_map.values())
    return next(k for k, f in weight_map.items() if files.count(f) > 1)


def test_sharded_index_and_shards(tmp_path, monkeypatch):
    import mlxeff.io as io

    monkeypatch.setattr(io, "MAX_SHARD_BYTES", 20_000)
    d = mlxeff_dir(tmp_path / "m")
    index = d / "model.safetensors.index.json"
    good = index.read_text()
    model, _ = mlxeff.load(d)
    assert logits_finite(model)
    for change, match in [
        (lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "../model-00001-of-00099.safetensors"}),
         r"not a file name in this directory"),
        (lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "model-" + "9" * 4301 + ".safetensors"}),
         r"not a file name in this directory"),
        (lambda i: i["weight_map"].update({next(iter(i["weight_map"])): "model-\ud800.safetensors"}),
         r"not a file name in this directory"),
        (lambda i: i["weight_map"].pop(_shared_shard_tensor(i["weight_map"])), r"but the index says None"),
        (lambda i: i["metadata"].update(total_size=1), r"metadata.total_size says 1 bytes"),
        (lambda i: i.update(weight_map=[]), r"no weight_map object"),
    ]:
        i = json.loads(good)
        change(i)
        index.write_text(json.dumps(i))
        refused(d, match, index)
    index.write_text(good)
    shard = next(d.glob("model-00002-*.safetensors"))
    shard.rename(d / "moved")
    refused(d, rf"the index names {shard.name}, which is missing", index)
    (d / "moved").rename(shard)
    stray = d / "model-00099-of-00099.safetensors"
    shutil.copy(next(d.glob("model-00001-*.safetensors")), stray)
    refused(d, r"model-00099-of-00099.safetensors is not listed in the index", index)


def test_read_header_reports(tmp_path):
    f = tmp_path / "a.safetensors"
    mx.save_safetensors(str(f), {"a": mx.zeros((3, 2)), "b": mx.zeros((0,))}, metadata={"k": "v"})
    h = read_header(f)
    assert h.tensors["a"].shape == (3, 2) and h.tensors["a"].nbytes == 24 and h.metadata == {"k": "v"}


@pytest.mark.parametrize("name", ["evil\nname", "\ud800", "x\x00y"])
def test_strange_tensor_names_stay_on_one_line(f32, name):
    def rename(h):
        h[name] = h.pop(first_tensor(h))
        return h
    edit_header(f32 / "model.safetensors", rename)
    refused(f32, r"is not valid Unicode" if name == "\ud800" else r"missing weights: .*|unexpected weights: ")
