"""The native runner's byte-level BPE (runtime_ops/runner/) against HF `tokenizers` on SmolLM2's
tokenizer: WikiText-2 lines plus strings aimed at each pre-tokenizer rule (contractions, digit
runs, whitespace runs and Unicode spaces, special tokens, emoji, CJK, accents, combining marks)
and seeded random strings. All strings go through one runner process (--encode-file)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNNER = ROOT / "runtime_ops" / "build" / "kvq_runner"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"

HANDPICKED = [
    "Hello world", " leading space", "trailing space ", "  two leading", "a  b   c    d", "tabs\tand\nnewlines\r\n",
    "\n\n\nparagraphs\n\n", "   ", " ", "\t", "x \n y", "end with newline\n", "  \n  \n", "\u00a0nbsp\u00a0x", "ideographic\u3000space",
    "line\u2028sep\u2029par", "nel\u0085x", "\x0bvt\x0cff", "\x1c\x1d\x1e\x1f unit separators", "zero\u200bwidth",
    "don't can't I'm you're we've they'll he'd it's", "DON'T I'M", "''s ''' 's 'S", "rock'n'roll", "'",
    "1234567890", "3.14159 and 1,000,000", "2024-01-01T12:00:00Z", "x1y22z333", "٣٤٥ arabic-indic digits", "Ⅻ roman ½ fractions ²",
    "café naïve résumé coöperate", "Zürich Straße", "e\u0301 combining acute", "Ωμέγα ελληνικά", "Привет, мир!", "שלום עולם", "مرحبا بالعالم",
    "नमस्ते दुनिया", "你好，世界！", "日本語のテキスト、カタカナ。", "한국어 텍스트", "ไทย ภาษา",
    "emoji 😀😃😄 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️", "math ∑∫√∞ ≠ ≤", "symbols ©®™ §¶ †‡ •", "code: if (x >= 10) { return y->z; }",
    "<|endoftext|>", "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n", "text<|im_end|>text", "<|im_sta partial",
    "<|endoftext|><|endoftext|>", " <|im_start|> spaced ", "<repo_name>x<file_sep>y<filename>z", "<jupyter_code>print(1)",
    "URL https://example.com/a?b=c&d=e#f", "email someone@example.org", "@@@ ### $$$ %%% ^^^", "...!!!???", "—–-", "«quotes» „low“ ‚single‘",
    "\ufeffBOM", "a\u0000nul", "\U0001d400 math bold", "\U00020000 CJK ext B", "x" * 300, " " * 40 + "x", "ab" * 100,
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings mixing the classes the regex separates (letters, numbers, spaces, other, quotes)."""
    pool = list("aZéßçЖж中文日本ё0123456789٣½Ⅻ  \t\n\r\x0b\u00a0\u3000\u2028\u0085'\"!?.,-_()[]<>|😀👍🏽\u0301\u200d") + ["'s", "'re", "<|im_end|>", "  "]
    rng = random.Random(seed)
    return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def corpus() -> list[str]:
    lines = [line for line in WIKITEXT.read_text(encoding="utf-8").split("\n") if line.strip()] if WIKITEXT.exists() else []
    return HANDPICKED + lines[:2500] + random_strings(600)


@pytest.fixture(scope="module")
def tokenizer_json(tokenizer, tmp_path_factory) -> Path:
    """SmolLM2's tokenizer.json exactly as a bundle carries it (saved by transformers)."""
    if not RUNNER.exists():
        pytest.fail(f"{RUNNER} is not built: run `.venv/bin/python runtime_ops/build.py` (make setup)")
    out = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(out)
    return out / "tokenizer.json"


def dropped_bytes(tokenizer_json: Path) -> set[int]:
    """Bytes whose GPT-2 stand-in character is not in the vocabulary (no unk, no byte fallback)."""
    vocab = json.loads(tokenizer_json.read_text())["model"]["vocab"]
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    stand_in = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}
    return {b for b, c in stand_in.items() if c not in vocab}


def runner_json(*args: str) -> dict:
    res = subprocess.run([str(RUNNER), *args], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout)


def write_lines(path: Path, items) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in items))
    return path


def test_encode_matches_hf_and_decode_round_trips(tokenizer, tokenizer_json, tmp_path):
    strings = corpus()
    assert len(strings) > 2000 or not WIKITEXT.exists()
    got = runner_json("--tokenizer", str(tokenizer_json), "--encode-file", str(write_lines(tmp_path / "s.jsonl", strings)))["ids"]
    backend = tokenizer.backend_tokenizer
    want = [e.ids for e in backend.encode_batch(strings, add_special_tokens=False)]
    bad = [(s, g, w) for s, g, w in zip(strings, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(strings)} strings differ; first: {bad[0]!r}"

    texts = runner_json("--tokenizer", str(tokenizer_json), "--decode-file", str(write_lines(tmp_path / "i.jsonl", want)))["texts"]
    assert texts == [backend.decode(ids, skip_special_tokens=False) for ids in want]
    # lossless, but for bytes whose stand-in SmolLM2's vocabulary lacks (both tokenizers drop them)
    lossy = dropped_bytes(tokenizer_json)
    assert 0 < len(lossy) < 32
    assert [t for t, s in zip(texts, strings) if t != s and not lossy & set(s.encode())] == []


def test_single_token_decode_matches_hf_including_partial_utf8(tokenizer, tokenizer_json, tmp_path):
    """Tokens holding part of a multi-byte character decode to U+FFFD exactly where HF's do."""
    rng = random.Random(1)
    ids = [[i] for i in rng.sample(range(len(tokenizer)), 1500)]
    ids += [[i] for i in tokenizer.encode("😀👨‍👩‍👧 日本語 é", add_special_tokens=False)]
    ids += [ids_ for ids_ in ([[rng.randrange(len(tokenizer)) for _ in range(rng.randint(2, 6))] for _ in range(300)])]
    texts = runner_json("--tokenizer", str(tokenizer_json), "--decode-file", str(write_lines(tmp_path / "i.jsonl", ids)))["texts"]
    want = [tokenizer.backend_tokenizer.decode(x, skip_special_tokens=False) for x in ids]
    bad = [(x, t, w) for x, t, w in zip(ids, texts, want) if t != w]
    assert not bad, f"{len(bad)} differ; first: {bad[0]!r}"


def test_cli_encode_and_decode_ids(tokenizer, tokenizer_json):
    text = "The capital of France is Paris. 1234 <|im_end|>"
    ids = runner_json("--tokenizer", str(tokenizer_json), "--encode", text)["ids"]
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    assert runner_json("--tokenizer", str(tokenizer_json), "--decode-ids", ",".join(map(str, ids)))["text"] == text


def test_unicode_tables_are_generated_and_current():
    """unicode_tables.h is what gen_unicode_tables.py writes from this Python's unicodedata."""
    script = ROOT / "runtime_ops" / "runner" / "gen_unicode_tables.py"
    res = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_unsupported_tokenizer_is_named(tmp_path, tokenizer_json):
    cfg = json.loads(tokenizer_json.read_text())
    cfg["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(cfg))
    res = subprocess.run([str(RUNNER), "--tokenizer", str(bad), "--encode", "x"], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and res.stdout == ""
    assert "Metaspace" in res.stderr and "not supported" in res.stderr


@pytest.mark.parametrize("individual", [True, False])
def test_digits_sequence_pre_tokenizer_matches_hf(tokenizer_json, tmp_path, individual):
    """SmolLM2's hub tokenizer.json has Sequence[Digits(individual), ByteLevel]; the GGUF-derived one
    only ByteLevel. Both forms must match."""
    from tokenizers import Tokenizer

    cfg = json.loads(tokenizer_json.read_text())
    cfg["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": individual}, dict(cfg["pre_tokenizer"], add_prefix_space=not individual)]}
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(cfg))
    strings = HANDPICKED + random_strings(300, seed=7)
    got = runner_json("--tokenizer", str(path), "--encode-file", str(write_lines(tmp_path / "s.jsonl", strings)))["ids"]
    want = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(strings, add_special_tokens=False)]
    bad = [(s, g, w) for s, g, w in zip(strings, got, want) if g != w]
    assert not bad, f"{len(bad)} differ; first: {bad[0]!r}"
