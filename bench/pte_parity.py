"""A bundle's .pte vs the eager PyTorch decoder it was exported from, on greedy generation.

    python bench/pte_parity.py bundles/smollm2-135m-learned --tokens 64

For each prompt (chat template): the .pte generates ``tokens`` greedy tokens; the eager
ExportableDecoder (same model, policy, controller, budget, weights and layout, rebuilt from the
manifest's options) generates its own. Reported per prompt: whether the token sequences are
identical, then, with both fed the same tokens (the .pte's), whether every stored bit-width is
identical and the largest logit difference. JSON to bench/results/pte_parity_<bundle>.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch
from rich.console import Console
from rich.table import Table

RESULTS = Path(__file__).parent / "results"
PROMPTS = (
    "Give me three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about the sea.",
    "What is the capital of France, and what is it famous for?",
    "List the planets of the solar system in order.",
)


def greedy(dec, ids: torch.Tensor, n: int, eos: set[int]) -> list[int]:
    logits, _ = dec.feed(ids)
    out: list[int] = []
    while len(out) < n:
        out.append(int(logits.argmax()))
        if out[-1] in eos or len(out) == n:
            break
        logits = dec.step(torch.tensor(out[-1:]))[0][-1]
    return out


def forced(dec, ids: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    logits, bits = dec.feed(ids)
    rows, widths = [logits], [bits]
    for t in tokens[:-1]:
        lg, b = dec.step(torch.tensor([t]))
        rows.append(lg[-1]), widths.append(b)
    return torch.stack(rows), torch.cat(widths)


@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--tokens", default=64, show_default=True)
@click.option("--prompts", "n_prompts", default=5, show_default=True)
def main(bundle_dir, tokens, n_prompts):
    from adaptive_kv import ops
    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.policy import default_controller_path, make_policy
    from export.bundle_runner import BundleRunner
    from export.pte import PteConfig, build_decoder

    ops.load_library()
    runner = BundleRunner(bundle_dir)
    opts = runner.bundle.manifest["options"]
    model, _ = load_model(opts["model"])
    controller = opts["controller"] or (str(default_controller_path()) if opts["policy"] == "learned" else None)
    policy = make_policy(opts["policy"], controller=controller, model_id=model_id(model), budget_bits=opts["budget_bits"])
    eager = build_decoder(model, policy, PteConfig(max_seq_len=opts["max_seq_len"], chunk_size=opts["chunk_size"], weights=opts["weights"],
                                                   kv_group_size=opts["kv_group_size"], hadamard=opts["hadamard"]))
    eos = set(runner.decoder.eos_ids)
    rows = []
    for prompt in PROMPTS[:n_prompts]:
        ids = torch.tensor(runner.encode(prompt))
        runner.decoder.reset(), eager.reset()
        got, want = greedy(runner.decoder, ids, tokens, eos), greedy(eager, ids, tokens, eos)
        runner.decoder.reset(), eager.reset()
        (lp, bp), (le, be) = forced(runner.decoder, ids, got), forced(eager, ids, got)
        rows.append({"prompt": prompt, "generated": len(got), "tokens_identical": got == want,
                     "first_divergence": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None),
                     "bits_identical": torch.equal(bp, be), "bits_mix": {int(b): int((bp == b).sum()) for b in bp.unique()},
                     "logits_max_abs_diff": float((lp - le).abs().max())})
    result = {"bundle": str(bundle_dir), "weights": opts["weights"], "policy": opts["policy"], "tokens": tokens, "prompts": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pte_parity_{bundle_dir.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f".pte vs eager: {bundle_dir.name} ({opts['policy']}, {opts['weights']}), {tokens} greedy tokens")
    for col in ("prompt", "tokens", "same tokens", "same bits", "max |Δlogit|", "bits mix"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["prompt"][:32], str(r["generated"]), str(r["tokens_identical"]), str(r["bits_identical"]),
                      f"{r['logits_max_abs_diff']:.2e}", str(r["bits_mix"]))
    Console().print(table)


if __name__ == "__main__":
    main()
