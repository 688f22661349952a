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
