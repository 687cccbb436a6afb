"""Tokenizer files from a stranger: special files and oversized files are refused before a byte is
read, files may not point outside their directory, and ids must fit the model's vocabulary."""

import json
import os
import shutil
import time

import pytest

import mlxeff
from hostile import mlxeff_dir
from mlxeff import data
from mlxeff.convert import convert
from mlxeff.errors import MlxeffError


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer):
    return mlxeff_dir(tmp_path_factory.mktemp("tok") / "m", tokenizer=tiny_tokenizer, vocab=len(tiny_tokenizer))


@pytest.fixture
def model_dir(base, tmp_path):
    shutil.copytree(base, tmp_path / "m")
    return tmp_path / "m"


def refused(d, match, file=None):
    t = time.perf_counter()
    with pytest.raises(MlxeffError, match=match) as e:
        mlxeff.load(d)
    assert str(file or d) in str(e.value) and time.perf_counter() - t < 10
    return e.value


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "chat_template.jinja"])
@pytest.mark.parametrize("target,kind", [("/dev/zero", "a character device"), ("/dev/urandom", "a character device"),
                                         ("fifo", "a FIFO"), ("dir", "a directory")])
def test_special_files_refused(model_dir, name, target, kind):
    f = model_dir / name
    f.unlink(missing_ok=True)
    if target == "fifo":
        os.mkfifo(f)
    elif target == "dir":
        f.mkdir()
    else:
        os.symlink(target, f)
    refused(model_dir, rf"expected a regular file, found {kind}", f)


def test_oversized_and_dangling(model_dir):
    f = model_dir / "tokenizer.json"
    f.unlink()
    with open(f, "wb") as fh:
        fh.truncate(65 << 20)  # sparse: no disk used, and never read
    refused(model_dir, r"tokenizer file of 68,157,440 bytes exceeds the limit of 67,108,864", f)
    f.unlink()
    os.symlink("nowhere.json", f)
    refused(model_dir, r"no such tokenizer file", f)


@pytest.mark.parametrize("key,value,match", [
    ("tokenizer_file", "/etc/hostname", r"tokenizer_file '/etc/hostname' does not name a file in this directory"),
    ("vocab_file", "../vocab.json", r"vocab_file '../vocab.json' does not name"),
    ("fast_tokenizer_files", ["tokenizer.x/../../y.json"], r"fast_tokenizer_files .* does not name"),
    ("chat_template_type", "..os", r"chat_template_type '..os' is not a plain module name"),
    ("tool_parser_type", 7, r"tool_parser_type 7 is not a plain module name"),
    ("model_max_length", [], r"model_max_length must be a number, got \[\]"),
])
def test_tokenizer_config_cannot_point_elsewhere(model_dir, key, value, match):
    f = model_dir / "tokenizer_config.json"
    cfg = json.loads(f.read_text())
    cfg[key] = value
    f.write_text(json.dumps(cfg))
    refused(model_dir, match, f)


def test_token_ids_must_fit_the_vocabulary(model_dir):
    f = model_dir / "tokenizer.json"
    tok = json.loads(f.read_text())
    tok["added_tokens"].append({"id": 5000, "content": "<big>", "single_word": False, "lstrip": False,
                                "rstrip": False, "normalized": False, "special": True})
    f.write_text(json.dumps(tok))
    refused(model_dir, r"the tokenizer has token id \d+ but the model's vocabulary has \d+ rows")


def test_tokenizers_panic_is_one_error(model_dir, monkeypatch):
    import mlx_lm.tokenizer_utils as tu
    from tokenizers import Tokenizer

    f = model_dir / "tokenizer.json"
    tok = json.loads(f.read_text())
    tok["truncation"] = {"direction": "Right", "max_length": 9, "strategy": "LongestFirst", "stride": 20}
    f.write_text(json.dumps(tok))
    refused(model_dir, r"cannot load the tokenizer \(tokenizer stride set to 20")  # transformers catches it
    # tokenizers itself panics on it; pyo3's PanicException derives from BaseException, not Exception

    def panicking_load(*args, **kwargs):
        Tokenizer.from_str(json.dumps(tok)).encode("Once upon a time there was a little girl")

    monkeypatch.setattr(tu, "load", panicking_load)
    refused(model_dir, r"cannot load the tokenizer \(`stride` must be strictly less than `max_len=9`")


def test_broken_tokenizer_json_is_one_line(model_dir):
    (model_dir / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": 5}}')
    e = refused(model_dir, r"cannot load the tokenizer")
    assert "\n" not in str(e)


def test_one_loader(tmp_path, tiny_tokenizer):
    import mlxeff.io
    import mlxeff.tokenizer

    assert data.load_tokenizer is mlxeff.tokenizer.load_tokenizer
    d = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(d))
    assert data.load_tokenizer(d).encode("Once upon") == mlxeff.io.load_tokenizer(d).encode("Once upon")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MlxeffError, match="no tokenizer files"):
        data.load_tokenizer(empty)
    assert mlxeff.io.load_tokenizer(empty) is None


def test_convert_refuses_a_special_file_in_a_tokenizer_directory(tmp_path, tiny_tokenizer):
    from hostile import corenet_file, tiny_model

    model = tiny_model(vocab=len(tiny_tokenizer))
    pt = corenet_file(tmp_path / "c.pt", model)
    tok = tmp_path / "tok"
    tiny_tokenizer.save_pretrained(str(tok))
    (tok / "tokenizer.json").unlink()
    os.symlink("/dev/zero", tok / "tokenizer.json")
    with pytest.raises(MlxeffError, match=r"tokenizer.json: expected a regular file, found a character device"):
        convert(pt, tmp_path / "out", config=model.args, tokenizer=tok, progress=False)
    assert not (tmp_path / "out").exists()
