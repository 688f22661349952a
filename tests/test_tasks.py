"""Evaluation task loaders: exact lm-eval 0.4.x prompts on the real shared data, and every error path.

Expected strings were derived by hand from the raw files and checked against lm-eval 0.4.13's
own hellaswag ``utils.process_docs`` and the arc/openbookqa/piqa YAML templates.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from adaptive_kv.tasks import (
    ALL_TASKS,
    DATA_ENV,
    MC_TASKS,
    DataError,
    MultipleChoiceItem,
    PasskeyTrial,
    calibration_path,
    data_root,
    default_path,
    load_multiple_choice,
    load_text,
    passkey_trials,
    piqa_labels_path,
)

needs_data = pytest.mark.skipif(
    not all((data_root() / rel).is_file() for rel in ("hellaswag/hellaswag_val.dev.jsonl", "piqa/valid.dev.jsonl")),
    reason=f"shared evaluation data not found under {data_root()} (set {DATA_ENV})",
)


# ----------------------------------------------------------------------------- real data, item 0


@needs_data
def test_hellaswag_item0() -> None:
    items = load_multiple_choice("hellaswag", limit=3)
    assert items[0] == MultipleChoiceItem(
        context="Roof shingle removal: A man is sitting on a roof. He",
        continuations=(
            " is using wrap to wrap a pair of skis.",
            " is ripping level tiles off.",
            " is holding a rubik's cube.",
            " starts pulling up roofing on a roof.",
        ),
        label=3,
    )
    assert items[1].context == "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady"


@needs_data
def test_hellaswag_wikihow_preprocessing() -> None:
    # Line 3244 is the first WikiHow item: [header]/[title]/[step]/[substeps] artifacts, empty ctx_b.
    item = load_multiple_choice("hellaswag")[3243]
    assert item.context == (
        "Personal Care and Style: How to become a fashion consultant. Obtain your high school diploma or ged. "
        "This job requires a high school diploma or equivalent, so make sure to apply yourself and finish school. "
        "If your high school offers these classes, take art, design, and sewing to familiarize yourself with "
        "foundational concepts in fashion."
    )
    # lm-eval strips before dropping brackets, so a leading "[substeps] " leaves a space: two after the delimiter.
    assert item.continuations[0] == (
        "  Many high schools have classes offered for their students who do not have a high school diploma, "
        "so be sure to register to take these classes and find a job in your field.. "
        "Search for entry-level positions in fashion industries."
    )
    assert item.continuations[3] == (
        "  Earn a bachelor's degree in a fashion-related field. "
        "Degrees for the fashion industry include art, fashion merchandising, and marketing."
    )
    assert item.label == 3


@needs_data
def test_arc_easy_item0() -> None:
    item = load_multiple_choice("arc_easy", limit=1)[0]
    assert item == MultipleChoiceItem(
        context="Question: Which technology was developed most recently?\nAnswer:",
        continuations=(" cellular telephone", " television", " refrigerator", " airplane"),
        label=0,
    )


@needs_data
def test_arc_challenge_item0() -> None:
    item = load_multiple_choice("arc_challenge", limit=1)[0]
    assert item.context == (
        "Question: Juan and LaKeisha roll a few objects down a ramp. They want to see which object rolls the "
        "farthest. What should they do so they can repeat their investigation?\nAnswer:"
    )
    assert item.continuations == (
        " Put the objects in groups.",
        " Change the height of the ramp.",
        " Choose different objects to roll.",
        " Record the details of the investigation.",
    )
    assert item.label == 3


@needs_data
def test_arc_numeric_labels_map_by_label() -> None:
    # ARC-Easy-Dev line 9 labels its choices "1".."4" with answerKey "1"; line 64 has answerKey "2".
    items = load_multiple_choice("arc_easy", limit=64)
    assert items[8].context.startswith("Question: A green plant absorbs light.")
    assert items[8].continuations[0] == " obtain energy"
    assert items[8].label == 0
    assert items[63].continuations[items[63].label] == " pedigree chart"


def test_arc_labels_matched_by_label_not_position(tmp_path: Path) -> None:
    record = {
        "id": "x",
        "question": {"stem": "Pick", "choices": [{"text": "a", "label": "4"}, {"text": "b", "label": "2"}]},
        "answerKey": "2",
    }
    path = tmp_path / "arc.jsonl"
    path.write_text(json.dumps(record) + "\n")
    assert load_multiple_choice("arc_challenge", path)[0].label == 1


@needs_data
def test_openbookqa_item0() -> None:
    item = load_multiple_choice("openbookqa", limit=1)[0]
    assert item == MultipleChoiceItem(
        context=(
            "A person wants to start saving money so that they can afford a nice vacation at the end of the year. "
            "After looking over their budget and expenses, they decide the best way to save money is to"
        ),
        continuations=(" make more phone calls", " quit eating lunch out", " buy less with monopoly money", " have lunch with friends"),
        label=1,
    )


@needs_data
def test_piqa_first_items() -> None:
    items = load_multiple_choice("piqa", limit=3)
    assert items[0].context == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert items[0].continuations[0].startswith(" Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper")
    assert items[0].continuations[1].endswith("ripped jeans material, you will also need to supply it with a water bottle and a food dish.")
    # Texts are kept verbatim, trailing and double spaces included, as lm-eval does.
    assert items[1] == MultipleChoiceItem(
        "Question: dresser\nAnswer:", (" replace drawer with bobby pin ", " finish, woodgrain with  bobby pin "), 1
    )
    assert [i.label for i in items] == [0, 1, 1]


@needs_data
@pytest.mark.parametrize(("task", "count"), [("hellaswag", 5000), ("arc_easy", 570), ("arc_challenge", 299), ("openbookqa", 500), ("piqa", 900)])
def test_full_files_load(task: str, count: int) -> None:
    items = load_multiple_choice(task)
    assert len(items) == count
    for item in items:
        assert all(c.startswith(" ") for c in item.continuations)
        assert 0 <= item.label < len(item.continuations)
        assert not item.context.endswith(" ")


@needs_data
def test_limit_takes_prefix() -> None:
    full = load_multiple_choice("piqa")
    assert load_multiple_choice("piqa", limit=5) == full[:5]
    assert len(load_multiple_choice("openbookqa", limit=10_000)) == 500


@needs_data
def test_wikitext_raw_exact() -> None:
    text = load_text()
    raw = default_path("wikitext2").read_bytes()
    assert text.encode("utf-8") == raw
    assert text.startswith(" \n = Robert Boulter = \n \n Robert Boulter is an English film , television")
    assert text.count("\n") == 4358


def test_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert data_root() == tmp_path
    assert default_path("hellaswag") == tmp_path / "hellaswag" / "hellaswag_val.dev.jsonl"
    assert default_path("arc_easy") == tmp_path / "arc_easy" / "ARC-Easy-Dev.jsonl"
    assert default_path("arc_challenge") == tmp_path / "arc_challenge" / "ARC-Challenge-Dev.jsonl"
    assert default_path("openbookqa") == tmp_path / "openbookqa" / "test.jsonl"
    assert default_path("piqa") == tmp_path / "piqa" / "valid.dev.jsonl"
    assert default_path("wikitext2") == tmp_path / "wikitext2" / "wiki.test.raw"
    assert calibration_path() == tmp_path / "wikitext2" / "wiki.valid.tokens"
    assert piqa_labels_path(default_path("piqa")) == tmp_path / "piqa" / "valid-labels.dev.lst"
    assert piqa_labels_path(tmp_path / "valid.jsonl") == tmp_path / "valid-labels.lst"
    monkeypatch.delenv(DATA_ENV)
    repo_relative = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    assert data_root() == (repo_relative if repo_relative.is_dir() else Path.cwd() / ".." / "shared" / "data")


def test_task_lists() -> None:
    assert MC_TASKS == ("hellaswag", "arc_easy", "arc_challenge", "openbookqa", "piqa")
    assert ALL_TASKS == MC_TASKS + ("wikitext2", "passkey")


# ----------------------------------------------------------------------------- errors


def _hellaswag_record(**overrides: object) -> dict[str, object]:
    record: dict[str, object] = {
        "activity_label": "A", "ctx_a": "b.", "ctx_b": "c", "endings": ["d", "e"], "label": 1,
    }
    record.update(overrides)
    return record


def test_missing_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=re.escape(str(missing)) + r".*--data PATH or set KVEXPORT_DATA_DIR"):
        load_multiple_choice("hellaswag", missing)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(DataError, match=r"wiki\.test\.raw.*KVEXPORT_DATA_DIR"):
        load_text()
    with pytest.raises(DataError, match=r"ARC-Easy-Dev\.jsonl"):
        load_multiple_choice("arc_easy")


def test_invalid_json_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_hellaswag_record()) + "\n\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:3") + ".*not valid JSON"):
        load_multiple_choice("hellaswag", path)
    # A bad line past the limit is never parsed.
    assert len(load_multiple_choice("hellaswag", path, limit=1)) == 1


def test_non_object_line(tmp_path: Path) -> None:
    path = tmp_path / "list.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + ".*JSON object"):
        load_multiple_choice("hellaswag", path)


@pytest.mark.parametrize(
    ("task", "record", "field"),
    [
        ("hellaswag", {k: v for k, v in _hellaswag_record().items() if k != "endings"}, "endings"),
        ("hellaswag", {k: v for k, v in _hellaswag_record().items() if k != "ctx_b"}, "ctx_b"),
        ("arc_easy", {"question": {"choices": [{"text": "a", "label": "A"}]}, "answerKey": "A"}, "question.stem"),
        ("openbookqa", {"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}}, "answerKey"),
        ("piqa", {"goal": "g", "sol1": "a"}, "sol2"),
    ],
)
def test_missing_field(tmp_path: Path, task: str, record: dict[str, object], field: str) -> None:
    path = tmp_path / "valid.jsonl"
    path.write_text(json.dumps(record) + "\n")
    (tmp_path / "valid-labels.lst").write_text("0\n")
    with pytest.raises(DataError, match=re.escape(f"{path}:1") + f".*missing required field '{re.escape(field)}'"):
        load_multiple_choice(task, path)


def test_bad_field_values(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(_hellaswag_record(label=7)) + "\n")
    with pytest.raises(DataError, match="out of range"):
        load_multiple_choice("hellaswag", path)
    path.write_text(json.dumps(_hellaswag_record(endings="d")) + "\n")
    with pytest.raises(DataError, match="'endings' has type str"):
        load_multiple_choice("hellaswag", path)
    arc = tmp_path / "arc.jsonl"
    arc.write_text(json.dumps({"question": {"stem": "s", "choices": [{"text": "a", "label": "A"}]}, "answerKey": "E"}) + "\n")
    with pytest.raises(DataError, match="answerKey 'E' matches none"):
        load_multiple_choice("arc_easy", arc)


def test_hellaswag_string_label(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(_hellaswag_record(label="0")) + "\n")
    assert load_multiple_choice("hellaswag", path)[0] == MultipleChoiceItem("A: b. C", (" d", " e"), 0)


def test_unknown_task() -> None:
    with pytest.raises(DataError, match="unknown task 'mmlu'.*hellaswag, arc_easy, arc_challenge, openbookqa, piqa, wikitext2, passkey"):
        load_multiple_choice("mmlu")
    with pytest.raises(DataError, match="unknown task 'mmlu'"):
        default_path("mmlu")
    with pytest.raises(DataError, match="not multiple-choice"):
        load_multiple_choice("wikitext2")
    with pytest.raises(DataError, match="passkey_trials"):
        default_path("passkey")


@pytest.mark.parametrize("limit", [0, -1])
def test_bad_limit(tmp_path: Path, limit: int) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(_hellaswag_record()) + "\n")
    with pytest.raises(DataError, match="limit must be a positive integer"):
        load_multiple_choice("hellaswag", path, limit=limit)


def _piqa_files(tmp_path: Path, n_items: int, labels: str) -> Path:
    path = tmp_path / "valid.jsonl"
    path.write_text("".join(json.dumps({"goal": f"g{i}", "sol1": "a", "sol2": "b"}) + "\n" for i in range(n_items)))
    (tmp_path / "valid-labels.lst").write_text(labels)
    return path


def test_piqa_labels(tmp_path: Path) -> None:
    path = _piqa_files(tmp_path, 2, "1\n0\n")
    assert [i.label for i in load_multiple_choice("piqa", path)] == [1, 0]


def test_piqa_label_count_mismatch(tmp_path: Path) -> None:
    path = _piqa_files(tmp_path, 3, "1\n0\n")
    with pytest.raises(DataError, match=r"valid-labels\.lst has 2 labels but .*valid\.jsonl has 3 items"):
        load_multiple_choice("piqa", path)
    with pytest.raises(DataError, match="has 2 labels"):  # checked even when only a prefix is wanted
        load_multiple_choice("piqa", path, limit=1)


def test_piqa_bad_or_missing_labels(tmp_path: Path) -> None:
    path = _piqa_files(tmp_path, 2, "1\n2\n")
    with pytest.raises(DataError, match=r"valid-labels\.lst:2: piqa label '2'"):
        load_multiple_choice("piqa", path)
    path.rename(tmp_path / "gone.jsonl")
    with pytest.raises(DataError, match=r"piqa data file not found: .*valid\.jsonl"):
        load_multiple_choice("piqa", path)
    (tmp_path / "gone.jsonl").rename(path)
    (tmp_path / "valid-labels.lst").unlink()
    with pytest.raises(DataError, match=r"piqa labels file not found: .*valid-labels\.lst.*KVEXPORT_DATA_DIR"):
        load_multiple_choice("piqa", path)


def test_load_text_exact_bytes(tmp_path: Path) -> None:
    path = tmp_path / "w.raw"
    path.write_bytes(" = T = \r\n caf\xc3\xa9 \n".encode("latin-1"))
    assert load_text(path) == " = T = \r\n café \n"  # no newline translation
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(DataError, match="not valid UTF-8"):
        load_text(path)


# ----------------------------------------------------------------------------- passkey


class WordTokenizer:
    """Stand-in tokenizer: one token per whitespace-separated word."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [len(w) for w in text.split()]


def _check_trials(trials: list[PasskeyTrial], tokenizer: object, context_tokens: int) -> None:
    for trial in trials:
        assert re.fullmatch(r"[1-9]\d{4}", trial.answer)
        assert trial.prompt.count(trial.answer) == 2
        assert len(re.findall(r"\d+", trial.prompt)) == 2  # no other digits to confuse retrieval
        assert trial.prompt.endswith("\nWhat is the pass key? The pass key is")
        assert f"The pass key is {trial.answer}. Remember it. {trial.answer} is the pass key." in trial.prompt
        assert 0.0 <= trial.depth <= 1.0
        n = len(tokenizer.encode(trial.prompt, add_special_tokens=False))  # type: ignore[attr-defined]
        assert context_tokens - 64 <= n <= context_tokens


def test_passkey_with_word_tokenizer() -> None:
    tok = WordTokenizer()
    trials = passkey_trials(tok, 500, 8, seed=3)
    _check_trials(trials, tok, 500)
    assert trials == passkey_trials(tok, 500, 8, seed=3)
    assert trials != passkey_trials(tok, 500, 8, seed=4)
    assert len({t.answer for t in trials}) > 1
    # The needle sits where the realized depth says: that fraction of the filler sentences precedes it.
    for t in trials:
        before, after = t.prompt.split("The pass key is " + t.answer, 1)
        n_before = before.count(".") - 3  # the instruction line has three sentences
        n_after = after.count(".") - 3  # the needle's three periods follow the split; the question has none
        assert t.depth == n_before / (n_before + n_after)


def test_passkey_bad_arguments() -> None:
    with pytest.raises(DataError, match="too small"):
        passkey_trials(WordTokenizer(), 20, 1)
    with pytest.raises(DataError, match="n must be a positive"):
        passkey_trials(WordTokenizer(), 500, 0)



@pytest.fixture(scope="module")
def smollm2_tokenizer(tokenizer: object) -> object:
    """The real SmolLM2 tokenizer (conftest's, shared with the other tests; installed by setup)."""
    return tokenizer


@pytest.mark.parametrize("context_tokens", [256, 1024, 2048])
def test_passkey_real_tokenizer_budget(smollm2_tokenizer: object, context_tokens: int) -> None:
    trials = passkey_trials(smollm2_tokenizer, context_tokens, 3, seed=0)  # type: ignore[arg-type]
    _check_trials(trials, smollm2_tokenizer, context_tokens)


def test_passkey_real_tokenizer_deterministic(smollm2_tokenizer: object) -> None:
    a = passkey_trials(smollm2_tokenizer, 512, 4, seed=7)  # type: ignore[arg-type]
    assert a == passkey_trials(smollm2_tokenizer, 512, 4, seed=7)  # type: ignore[arg-type]
    assert [t.answer for t in a] != [t.answer for t in passkey_trials(smollm2_tokenizer, 512, 4, seed=8)]  # type: ignore[arg-type]
