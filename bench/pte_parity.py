"""A bundle's .pte vs the eager PyTorch decoder it was exported from, on greedy generation.

    python bench/pte_parity.py bundles/smollm2-135m-learned --tokens 64
    python bench/pte_parity.py bundles/smol --program debug-with-state.pte   # synced check on another program

For each prompt (chat template), rebuilding the eager ExportableDecoder from the manifest's
options (model, policy, controller, budget, weights, layout):

- free: the .pte and eager each generate ``tokens`` greedy tokens (identical?), then both are fed
  the .pte's tokens (teacher forcing) with their own caches: bits identical? largest logit diff?
- synced (the program has a ``state`` method): the .pte generates; before every step the eager
  decoder takes the .pte's whole state (packed pools, lengths, token_bits, rarity counts, ...),
  so each step compares one step of the two implementations from the same state: largest logit
  diff, bits identical, and how many of the K/V rows written in the step differ in any byte.
- noise floor (``--noise-floor``): eager vs eager with the scalar kvq kernels (the same math with
  another fp32 summation order, nothing else changed), teacher-forced like ``free``.

Why both: a packed cache is a discontinuous function of K/V (code rounding, the fp16 scale and
zero, the clip choice), so a ~1e-7 relative difference in K/V (XNNPACK and ATen sum matmuls in
different orders) moves a few rows by a whole code or an fp16 ulp; later tokens attend to those
rows, their K/V differ by more, more rows flip, and within a few decode steps two correct
implementations hold different quantized caches (logits ~0.5 apart for static-4). ``free``
measures that cascade (compare it with the noise floor, which has it too); ``synced`` measures
whether the .pte implements the same step (it should be ~1e-4, fp16-cache-like).
JSON to bench/results/pte_parity_<bundle>.json.
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


def differing_rows(state: dict[str, torch.Tensor], eager, pool_bits) -> tuple[int, int]:
    """(rows that differ in any byte, filled rows) over every pool's filled slots; a row is one
    (layer, KV head, slot) of k or v with its codes, scales and zeros."""
    from adaptive_kv.formats import BIT_WIDTHS

    diff = total = 0
    for b in pool_bits:
        n = int(state["lengths"][BIT_WIDTHS.index(b)])
        for kv in "kv":
            parts = [f"{kv}{b}"] + ([] if b == 16 else [f"{kv}{b}_scale", f"{kv}{b}_zero"])
            bad = torch.zeros(state[parts[0]].shape[:2] + (n,), dtype=torch.bool)
            for name in parts:
                bad |= (state[name][:, :, :n] != getattr(eager, name)[:, :, :n]).any(-1)
            diff, total = diff + int(bad.sum()), total + bad.numel()
    return diff, total


def synced(pte, eager, ids: torch.Tensor, n: int, eos: set[int]) -> dict:
    """The .pte generates greedily; after each step the eager decoder takes the .pte's state, so
    every step starts both from the same cache."""
    names = eager.state_names()
    pte.reset(), eager.reset()
    worst, same, diff, written, out = 0.0, True, 0, 0, []
    todo = list(ids.split(pte.chunk_size))
    while todo:
        x = todo.pop(0)
        (lp, bp), (le, be) = pte.step(x), eager.step(x)
        worst, same = max(worst, float((lp - le).abs().max())), same and torch.equal(bp, be)
        state = pte.state(names)
        diff += differing_rows(state, eager, eager.pool_bits)[0]  # only this step's rows can differ
        written += 2 * eager.num_layers * eager.num_kv_heads * x.numel()
        with torch.no_grad():
            for name, t in state.items():
                getattr(eager, name).copy_(t)
        if not todo and len(out) < n:
            out.append(int(lp[-1].argmax()))
            if out[-1] not in eos and len(out) < n:
                todo.append(torch.tensor(out[-1:]))
    return {"logits_max_abs_diff": worst, "bits_identical": same, "rows_differing": diff, "rows_written": written}


@click.command()
@click.argument("bundle_dir", type=click.Path(exists=True, path_type=Path))
@click.option("--tokens", default=64, show_default=True)
@click.option("--prompts", "n_prompts", default=5, show_default=True)
@click.option("--program", type=click.Path(exists=True, path_type=Path), default=None,
              help="a .pte with a `state` method exported from the bundle's options (any max_seq_len): used for the synced check")
@click.option("--noise-floor/--no-noise-floor", default=True, show_default=True, help="also eager vs eager with the scalar kvq kernels")
def main(bundle_dir, tokens, n_prompts, program, noise_floor):
    from adaptive_kv import ops
    from adaptive_kv.model import load_model, model_id
    from adaptive_kv.policy import default_controller_path, make_policy
    from export.bundle_runner import BundleRunner
    from export.pte import PteConfig, build_decoder
    from export.pte_runner import PteDecoder

    ops.load_library()
    runner = BundleRunner(bundle_dir)
    opts = runner.bundle.manifest["options"]
    model, _ = load_model(opts["model"])
    controller = opts["controller"] or (str(default_controller_path()) if opts["policy"] == "learned" else None)
    policy = make_policy(opts["policy"], controller=controller, model_id=model_id(model), budget_bits=opts["budget_bits"])

    def eager_decoder(max_seq_len: int):
        return build_decoder(model, policy, PteConfig(max_seq_len=max_seq_len, chunk_size=opts["chunk_size"], weights=opts["weights"],
                                                      kv_group_size=opts["kv_group_size"], hadamard=opts["hadamard"],
                                                      query_bits=opts.get("query_bits", 32)))

    eager = eager_decoder(opts["max_seq_len"])
    checked = PteDecoder(program) if program else runner.decoder
    sync_pair = (checked, eager_decoder(checked.max_seq_len) if program else eager) if checked.has_state_method() else None
    eos = set(runner.decoder.eos_ids)
    rows = []
    for prompt in PROMPTS[:n_prompts]:
        ids = torch.tensor(runner.encode(prompt))
        runner.decoder.reset(), eager.reset()
        got, want = greedy(runner.decoder, ids, tokens, eos), greedy(eager, ids, tokens, eos)
        runner.decoder.reset(), eager.reset()
        (lp, bp), (le, be) = forced(runner.decoder, ids, got), forced(eager, ids, got)
        row = {"prompt": prompt, "generated": len(got), "tokens_identical": got == want,
               "first_divergence": next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None),
               "bits_identical": torch.equal(bp, be), "bits_mix": {int(b): int((bp == b).sum()) for b in bp.unique()},
               "logits_max_abs_diff": float((lp - le).abs().max())}
        if noise_floor:
            eager.reset()
            with ops.kernel_isa("scalar"):
                ls, bs = forced(eager, ids, got)
            row["noise_floor"] = {"logits_max_abs_diff": float((ls - le).abs().max()), "bits_identical": torch.equal(bs, be)}
        if sync_pair:
            row["synced"] = synced(*sync_pair, ids, tokens, eos)
        rows.append(row)
    result = {"bundle": str(bundle_dir), "weights": opts["weights"], "policy": opts["policy"], "tokens": tokens,
              "synced_program": str(program or bundle_dir) if sync_pair else None, "prompts": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"pte_parity_{bundle_dir.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = Table(title=f".pte vs eager: {bundle_dir.name} ({opts['policy']}, {opts['weights']}), {tokens} greedy tokens")
    for col in ("prompt", "tokens", "same tokens", "free: same bits", "free: max |Δlogit|", "noise floor |Δlogit|",
                "synced: same bits", "synced: max |Δlogit|", "synced: rows differing", "bits mix"):
        table.add_column(col)
    for r in rows:
        nf, sy = r.get("noise_floor"), r.get("synced")
        table.add_row(r["prompt"][:32], str(r["generated"]), str(r["tokens_identical"]), str(r["bits_identical"]),
                      f"{r['logits_max_abs_diff']:.2e}", f"{nf['logits_max_abs_diff']:.2e}" if nf else "-",
                      str(sy["bits_identical"]) if sy else "-", f"{sy['logits_max_abs_diff']:.2e}" if sy else "-",
                      f"{sy['rows_differing']}/{sy['rows_written']}" if sy else "-", str(r["bits_mix"]))
    Console().print(table)
    if not sync_pair:
        Console().print("no synced check: the program has no `state` method (pass --program with one exported with state_method=True)")


if __name__ == "__main__":
    main()
