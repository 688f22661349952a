"""Evaluation data: multiple-choice tasks, WikiText-2 text and synthetic passkey retrieval.

Multiple-choice prompts are rebuilt exactly as lm-evaluation-harness 0.4.x builds them
zero-shot (its task YAMLs' ``doc_to_text`` / ``doc_to_choice`` / ``doc_to_target`` and the
HellaSwag ``process_docs``), so accuracies computed here are comparable with published
lm-eval numbers. A request is scored as ``loglik(continuation | context)`` with
``context`` exactly as below and each continuation prefixed by lm-eval's default
``target_delimiter`` (one space).

The data files are read from :func:`data_root` (``$KVEXPORT_DATA_DIR`` or the project's
``../shared/data``); every loader also takes an explicit path.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

DATA_ENV = "KVEXPORT_DATA_DIR"
TARGET_DELIMITER = " "  # lm-eval's default target_delimiter, put before every choice

_FIX = f"pass --data PATH or set {DATA_ENV}"


class DataError(ValueError):
    """An evaluation file or argument is missing or malformed; the message says how to fix it."""


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One multiple-choice question as lm-eval scores it."""

    context: str  # text conditioned on (no trailing delimiter)
    continuations: tuple[str, ...]  # each choice with TARGET_DELIMITER prepended
    label: int  # index of the gold continuation


MC_TASKS: tuple[str, ...] = ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa")
ALL_TASKS: tuple[str, ...] = MC_TASKS + ("wikitext2", "passkey")

# Paths relative to data_root(); the Dev/valid splits are the evaluation sets of this project.
_DEFAULT_FILES: dict[str, str] = {
    "hellaswag": "hellaswag/hellaswag_val.dev.jsonl",
    "arc_easy": "arc_easy/ARC-Easy-Dev.jsonl",
    "arc_challenge": "arc_challenge/ARC-Challenge-Dev.jsonl",
    "openbookqa": "openbookqa/test.jsonl",
    "piqa": "piqa/valid.dev.jsonl",
    "wikitext2": "wikitext2/wiki.test.raw",
}
_CALIBRATION_FILE = "wikitext2/wiki.valid.tokens"


def data_root() -> Path:
    """Folder holding the evaluation data.

    ``$KVEXPORT_DATA_DIR`` if set (used as given, so a typo surfaces as a missing-file
    error instead of silently reading other data); else ``<repo root>/../shared/data``
    where the repo root is the parent of the ``adaptive_kv`` package; if that does not
    exist (e.g. an installed, non-editable package), ``Path.cwd()/"../shared/data"``.
    """
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parent.parent
    candidate = repo_root.parent / "shared" / "data"
    if candidate.is_dir():
        return candidate
    return Path.cwd() / ".." / "shared" / "data"


def _unknown_task(task: str) -> DataError:
    return DataError(f"unknown task {task!r}; known tasks: {', '.join(ALL_TASKS)}")


def default_path(task: str) -> Path:
    """The evaluation file of ``task`` under :func:`data_root` (PIQA's labels file sits beside it)."""
    if task == "passkey":
        raise DataError("task 'passkey' is synthetic and has no data file; build it with passkey_trials()")
    if task not in _DEFAULT_FILES:
        raise _unknown_task(task)
    return data_root() / _DEFAULT_FILES[task]


def calibration_path() -> Path:
    """WikiText-2 validation tokens: calibration / controller-training text, disjoint from evaluation."""
    return data_root() / _CALIBRATION_FILE


def piqa_labels_path(path: Path) -> Path:
    """Labels file paired with a PIQA ``.jsonl`` file, named as upstream does.

    ``valid.dev.jsonl`` -> ``valid-labels.dev.lst``, ``valid.jsonl`` -> ``valid-labels.lst``.
    """
    head, _, tail = path.name.partition(".")
    tail = tail[: -len("jsonl")] + "lst" if tail.endswith("jsonl") else "lst"
    return path.with_name(f"{head}-labels.{tail}")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise DataError(
            f"{what} file not found: {path}; {_FIX} (the data folder, laid out as in shared/data/README.md)"
        )


def _read_jsonl(path: Path, task: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, record) of each non-blank line, failing on the first bad one."""
    _require_file(path, f"{task} data")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not valid JSON ({e.msg}); each line of a {task} file must be "
                    f"one JSON object: repair the file or {_FIX} to an intact copy"
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}; "
                    f"repair the file or {_FIX} to an intact copy"
                )
            yield lineno, record


class _Record:
    """A JSON record plus where it came from, so every field error can name file and line."""

    def __init__(self, record: dict[str, Any], path: Path, lineno: int, task: str) -> None:
        self.record, self.path, self.lineno, self.task = record, path, lineno, task

    def error(self, problem: str) -> DataError:
        return DataError(
            f"{self.path}:{self.lineno}: {self.task} record {problem}; "
            f"repair the file or {_FIX} to a file in the upstream {self.task} format"
        )

    def get(self, dotted: str, kind: type | tuple[type, ...]) -> Any:
        """Field ``a.b`` of the record, which must be of type ``kind``."""
        value: Any = self.record
        for key in dotted.split("."):
            if not isinstance(value, dict) or key not in value:
                raise self.error(f"is missing required field {dotted!r}")
            value = value[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise self.error(f"field {dotted!r} has type {type(value).__name__}, expected {_kind_name(kind)}")
        return value

    def text_list(self, dotted: str) -> list[str]:
        values = self.get(dotted, list)
        if not values or not all(isinstance(v, str) for v in values):
            raise self.error(f"field {dotted!r} must be a non-empty list of strings")
        return values


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _label_index(value: int | str, n_choices: int, rec: _Record, field: str) -> int:
    # Upstream HellaSwag stores the label as an int, the HF copy as a digit string.
    if isinstance(value, str):
        if not value.strip().isdigit():
            raise rec.error(f"field {field!r}={value!r} is not an integer")
        value = int(value)
    if not 0 <= value < n_choices:
        raise rec.error(f"field {field!r}={value} is out of range for {n_choices} choices")
    return value


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval tasks/hellaswag/utils.py::preprocess; brackets are WikiHow artifacts.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def _choices(texts: list[str]) -> tuple[str, ...]:
    return tuple(TARGET_DELIMITER + t for t in texts)


def _hellaswag_item(rec: _Record) -> MultipleChoiceItem:
    # lm-eval hellaswag process_docs: query = preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    ctx = rec.get("ctx_a", str) + " " + rec.get("ctx_b", str).capitalize()
    context = _hellaswag_preprocess(rec.get("activity_label", str) + ": " + ctx)
    endings = rec.text_list("endings")
    label = _label_index(rec.get("label", (int, str)), len(endings), rec, "label")
    return MultipleChoiceItem(context, _choices([_hellaswag_preprocess(e) for e in endings]), label)


def _ai2_choices(rec: _Record) -> tuple[list[str], int]:
    """Choice texts and the gold index of an ARC/OpenBookQA record, matched by label."""
    choices = rec.get("question.choices", list)
    texts: list[str] = []
    labels: list[str] = []
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict) or not isinstance(choice.get("text"), str) or not isinstance(choice.get("label"), str):
            raise rec.error(f"choice {i} of 'question.choices' needs string fields 'text' and 'label'")
        texts.append(choice["text"])
        labels.append(choice["label"])
    if not texts:
        raise rec.error("field 'question.choices' is empty")
    # Some ARC items label choices "1"-"4": map answerKey by label, never by position.
    key = rec.get("answerKey", str).strip()
    if key not in labels:
        raise rec.error(f"answerKey {key!r} matches none of the choice labels {labels}")
    return texts, labels.index(key)


def _arc_item(rec: _Record) -> MultipleChoiceItem:
    # lm-eval arc_easy.yaml: doc_to_text "Question: {{question}}\nAnswer:", choices' text.
    texts, label = _ai2_choices(rec)
    return MultipleChoiceItem(f"Question: {rec.get('question.stem', str)}\nAnswer:", _choices(texts), label)


def _openbookqa_item(rec: _Record) -> MultipleChoiceItem:
    # lm-eval openbookqa.yaml: doc_to_text is the bare question_stem.
    texts, label = _ai2_choices(rec)
    return MultipleChoiceItem(rec.get("question.stem", str), _choices(texts), label)


def _piqa_item(rec: _Record, label: int) -> MultipleChoiceItem:
    # lm-eval piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2].
    context = f"Question: {rec.get('goal', str)}\nAnswer:"
    return MultipleChoiceItem(context, _choices([rec.get("sol1", str), rec.get("sol2", str)]), label)


def _read_piqa_labels(labels_path: Path, data_path: Path) -> list[int]:
    _require_file(labels_path, "piqa labels")
    labels: list[int] = []
    with labels_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            if line.strip() not in ("0", "1"):
                raise DataError(
                    f"{labels_path}:{lineno}: piqa label {line.strip()!r} is not 0 or 1; "
                    f"repair the file or {_FIX} to an intact copy"
                )
            labels.append(int(line))
    with data_path.open(encoding="utf-8") as f:
        n_items = sum(1 for line in f if line.strip())
    if n_items != len(labels):
        raise DataError(
            f"{labels_path} has {len(labels)} labels but {data_path} has {n_items} items; "
            f"they must pair line by line: use the labels file that belongs to this split"
        )
    return labels


_BUILDERS: dict[str, Callable[[_Record], MultipleChoiceItem]] = {
    "hellaswag": _hellaswag_item,
    "arc_easy": _arc_item,
    "arc_challenge": _arc_item,
    "openbookqa": _openbookqa_item,
}


def load_multiple_choice(task: str, path: Path | None = None, limit: int | None = None) -> list[MultipleChoiceItem]:
    """The first ``limit`` (default all) items of a multiple-choice task, in file order.

    ``path`` defaults to :func:`default_path`; for PIQA the labels file is found beside it
    (see :func:`piqa_labels_path`).
    """
    if task not in MC_TASKS:
        if task in ALL_TASKS:
            raise DataError(f"task {task!r} is not multiple-choice; multiple-choice tasks: {', '.join(MC_TASKS)}")
        raise _unknown_task(task)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit <= 0):
        raise DataError(f"limit must be a positive integer, got {limit!r}; omit it (None) to load every item")
    path = Path(path) if path is not None else default_path(task)
    _require_file(path, f"{task} data")  # before the PIQA labels, which are counted against it
    records = _read_jsonl(path, task)
    labels = _read_piqa_labels(piqa_labels_path(path), path) if task == "piqa" else None
    items: list[MultipleChoiceItem] = []
    for index, (lineno, record) in enumerate(records):
        rec = _Record(record, path, lineno, task)
        items.append(_piqa_item(rec, labels[index]) if labels is not None else _BUILDERS[task](rec))
        if limit is not None and len(items) >= limit:
            break  # stop early: later lines are not even parsed
    return items


def load_text(path: Path | None = None) -> str:
    """WikiText text (default: the raw WikiText-2 test split), byte-exact.

    Decoded from bytes so no newline translation happens: lm-eval's perplexities depend on
    the exact text.
    """
    path = Path(path) if path is not None else default_path("wikitext2")
    _require_file(path, "wikitext2 text")
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; {_FIX} to the original WikiText file") from None


# ---------------------------------------------------------------------------- passkey retrieval
# The classic synthetic passkey test (Mohtashami & Jaggi 2023, "Landmark Attention"; LongLoRA):
# instructions, filler, the needle at some depth, more filler, then the question.
PASSKEY_INSTRUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize them. I will quiz you about the important information there."
)
PASSKEY_FILLER: tuple[str, ...] = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
PASSKEY_QUESTION = "What is the pass key? The pass key is"


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass(frozen=True)
class PasskeyTrial:
    """One passkey retrieval prompt; the model should continue it with ``" " + answer``."""

    prompt: str  # filler with the needle at `depth`, ending with the question
    answer: str  # five digits, e.g. "68351"
    depth: float  # 0..1: fraction of the filler sentences that precede the needle


def _passkey_prompt(n_sentences: int, depth: float, answer: str) -> tuple[str, float]:
    at = round(depth * n_sentences)
    sentences = [PASSKEY_FILLER[i % len(PASSKEY_FILLER)] for i in range(n_sentences)]
    needle = f"The pass key is {answer}. Remember it. {answer} is the pass key."
    lines = [PASSKEY_INSTRUCTION, " ".join(sentences[:at]), needle, " ".join(sentences[at:]), PASSKEY_QUESTION]
    return "\n".join(lines), (at / n_sentences if n_sentences else 0.0)


_PASSKEY_SLACK = 64  # a prompt may fall short of context_tokens by at most this many tokens


def passkey_trials(tokenizer: Tokenizer, context_tokens: int, n: int, seed: int = 0) -> list[PasskeyTrial]:
    """``n`` passkey prompts of ``context_tokens - 64 .. context_tokens`` tokens each.

    Depths (uniform in [0, 1)) and 5-digit keys come from ``random.Random(seed)``, so the
    trials are identical for a seed. Lengths are measured with
    ``tokenizer.encode(prompt, add_special_tokens=False)``; a BOS token, if the caller adds
    one, is not counted. The filler is whole sentences, so the needle sits at a sentence
    boundary and ``depth`` reports its realized position.
    """
    if not isinstance(n, int) or n <= 0:
        raise DataError(f"n must be a positive number of trials, got {n!r}")
    rng = random.Random(seed)
    trials: list[PasskeyTrial] = []
    for _ in range(n):
        depth = rng.random()
        answer = str(rng.randint(10000, 99999))
        n_sentences = _fit_filler(tokenizer, context_tokens, depth, answer)
        prompt, realized = _passkey_prompt(n_sentences, depth, answer)
        trials.append(PasskeyTrial(prompt=prompt, answer=answer, depth=realized))
    return trials


def _fit_filler(tokenizer: Tokenizer, context_tokens: int, depth: float, answer: str) -> int:
    """Most filler sentences whose prompt still fits in ``context_tokens`` tokens."""

    def length(n_sentences: int) -> int:
        prompt, _ = _passkey_prompt(n_sentences, depth, answer)
        return len(tokenizer.encode(prompt, add_special_tokens=False))

    bare = length(0)
    if bare > context_tokens:
        raise DataError(
            f"context_tokens={context_tokens} is too small: the passkey prompt without filler "
            f"already has {bare} tokens; use context_tokens >= {bare + _PASSKEY_SLACK}"
        )
    # Every sentence is >= 1 token, so context_tokens + 1 sentences cannot fit.
    lo, hi = 0, context_tokens + 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if length(mid) <= context_tokens:
            lo = mid
        else:
            hi = mid
    # Token counts are only nearly monotone in the sentence count (merges around the needle
    # shift as it moves), so look a few sentences past the search result.
    best = max(s for s in range(lo, lo + 6) if s == lo or length(s) <= context_tokens)
    size = length(best)
    if size < context_tokens - _PASSKEY_SLACK:
        raise DataError(f"could not size a passkey prompt to {context_tokens} tokens (got {size}); try another context_tokens")
    return best
