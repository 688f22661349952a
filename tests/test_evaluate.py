import json
import math

import pytest
from click.testing import CliRunner

from adaptive_kv.decoder import PackedLlama
from adaptive_kv.evaluate import EvalConfig, Evaluator, encode_pair
from adaptive_kv.model import load_model
from adaptive_kv.policy import make_policy
from export.cli import main


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    model, tok = load_model(tiny_checkpoint)
    return PackedLlama(model), tok


def test_encode_pair_moves_trailing_spaces_like_lm_eval(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Question: hi\nAnswer: ", "yes")
    assert ctx == tokenizer.encode("Question: hi\nAnswer:", add_special_tokens=False)
    assert tokenizer.decode(cont) == " yes"


def run(tiny, task, policies, **kw):
    decoder, tok = tiny
    return Evaluator(decoder, tok, [make_policy(p) for p in policies], EvalConfig(task=task, **kw), progress=False).run()


@pytest.mark.parametrize("task,kw", [("hellaswag", dict(limit=3)), ("wikitext2", dict(limit=1, context=96, chunk_size=16)), ("passkey", dict(limit=2, context=160, chunk_size=32))])
def test_sharing_the_first_chunk_across_policies_changes_nothing(tiny, task, kw):
    both = run(tiny, task, ["static-2", "sink-recent", "rule"], **kw)
    for r in both:
        (alone,) = run(tiny, task, [r.policy], **kw)
        assert (alone.accuracy, alone.accuracy_norm, alone.n) == (r.accuracy, r.accuracy_norm, r.n)
        assert alone.perplexity == r.perplexity and alone.avg_bits == r.avg_bits


def test_results_report_bits_and_bytes(tiny):
    r16, r4, r2 = run(tiny, "wikitext2", ["fp16", "static-4", "static-2"], limit=1, context=128, chunk_size=16)
    assert (r16.avg_bits, r4.avg_bits, r2.avg_bits) == (16.0, 4.5, 2.5)
    assert r4.kv_bytes_per_token == 4.5 * 2 * 2 * 2 * 64 / 8  # 2 layers x 2 KV heads x K,V x 64
    assert r16.n == 1 and all(math.isfinite(r.perplexity) for r in (r16, r4, r2))
    assert r16.perplexity != r2.perplexity


def test_eval_cli_compares_query_precisions_in_one_pass(tiny_checkpoint):
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_checkpoint), "--task", "wikitext2", "--limit", "1", "--context", "128",
                                    "--chunk-size", "16", "--policy", "static-4", "--query-bits", "32,8", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output[res.output.index("{") :])["results"]
    assert [(r["policy"], r["query_bits"]) for r in rows] == [("static-4", 32), ("static-4", 8)]
    assert rows[0]["perplexity"] != rows[1]["perplexity"]  # the int8 query changes the scores a little
    assert abs(rows[0]["perplexity"] / rows[1]["perplexity"] - 1) < 0.05


def test_eval_cli_json(tiny_checkpoint):
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_checkpoint), "--task", "arc_easy", "--limit", "2", "--policy", "static-4", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{") :])
    assert {"task", "policy", "n", "accuracy", "accuracy_norm", "perplexity", "avg_bits", "kv_bytes_per_token", "seconds"} <= out.keys()
    assert out["task"] == "arc_easy" and out["n"] == 2 and out["avg_bits"] == 4.5


@pytest.mark.parametrize(
    "args,message",
    [
        (["--task", "nope"], "unknown task 'nope'"),
        (["--task", "hellaswag", "--policy", "static-3"], "unknown policy 'static-3'"),
        (["--task", "hellaswag", "--data", "/nonexistent/h.jsonl"], "not found"),
        (["--task", "hellaswag", "--limit", "0"], "must be positive"),
        (["--task", "wikitext2", "--context", "100000", "--limit", "1"], "exceeds the model's max_position_embeddings"),
        (["--task", "hellaswag", "--query-bits", "32,4"], "'4': the attention's query is 32 (fp32) or 8"),
    ],
)
def test_eval_cli_errors_are_one_clear_line(tiny_checkpoint, args, message):
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_checkpoint), *args])
    assert res.exit_code == 2, res.output
    assert message in " ".join(res.output.split())


def test_eval_cli_rejects_a_non_llama_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    res = CliRunner().invoke(main, ["eval", "--model", str(tmp_path), "--task", "hellaswag"])
    assert res.exit_code == 2 and "'mistral' model" in res.output


def test_garbled_data_file(tiny_checkpoint, tmp_path):
    bad = tmp_path / "h.jsonl"
    bad.write_text('{"ctx": "a"}\n{not json\n')
    res = CliRunner().invoke(main, ["eval", "--model", str(tiny_checkpoint), "--task", "hellaswag", "--data", str(bad)])
    assert res.exit_code == 2 and "h.jsonl" in res.output


@pytest.mark.parametrize("task,kw", [("hellaswag", dict(limit=2)), ("wikitext2", dict(limit=1, context=96, chunk_size=16)), ("passkey", dict(limit=1, context=160, chunk_size=32))])
def test_oracle_runs_every_task_within_its_budget(tiny, task, kw):
    decoder, tok = tiny
    (r,) = Evaluator(decoder, tok, [make_policy("oracle", budget_bits=3.0)], EvalConfig(task=task, **kw), progress=False).run()
    assert 2.5 <= r.avg_bits <= 3.0 + 1e-9 and r.n == kw["limit"]
