import json

import pytest

from adaptive_kv.model import ModelError, load_model


def test_missing_path_names_the_fix(tmp_path):
    with pytest.raises(ModelError, match="not found: pass an HF checkpoint folder"):
        load_model(tmp_path / "nope")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        load_model(tmp_path)


def test_non_llama_hf_checkpoint_names_the_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="holds a 'gpt2' model; kvexport supports llama"):
        load_model(tmp_path)


def test_non_llama_gguf_names_the_architecture(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match="holds a 'qwen2' model"):
        load_model(path)


def test_garbage_files_are_rejected(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_model(tmp_path / "x.gguf")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="not .gguf"):
        load_model(tmp_path / "w.bin")


def test_hf_checkpoint_folder_loads(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert tok.encode("hello", add_special_tokens=False)


def test_gguf_conversion_is_kept_and_keyed_by_the_file(tmp_path, monkeypatch, tiny_model, tokenizer):
    """A GGUF is converted once: the next load reads the kept HF folder (not the GGUF), and a
    changed file (size or mtime) misses it. The 'GGUF' here is garbage, so a load that parses
    it fails: the cache hit is the only way to succeed."""
    import os

    import torch

    from adaptive_kv import model as M

    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"not parsed when the conversion is kept")
    M._keep_converted(tiny_model, tokenizer, M._converted_folder(gguf, torch.float32))
    model, tok = load_model(gguf)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()))
    assert tok.encode("hello there") == tokenizer.encode("hello there")
    st = gguf.stat()
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_model(gguf)
    assert not list((tmp_path / "cache" / "gguf").glob(".*.tmp"))  # no half-written folder left
