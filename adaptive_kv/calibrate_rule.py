"""Recompute the rule policy's entropy thresholds on calibration text.

    python -m adaptive_kv.calibrate_rule [--model M] [--tokens 8192] [--window 512]

Runs the model at full precision over the first ``--tokens`` tokens of wiki.valid.tokens in
windows, and prints the 0.45 / 0.85 / 0.95 quantiles of the next-token entropy: the defaults
of :class:`adaptive_kv.policy.RulePolicy` come from this command.
"""

from __future__ import annotations

import click
import torch

from .features import next_token_stats
from .model import load_model
from .policy import RulePolicy
from .tasks import calibration_path, load_text


def rule_thresholds(model, ids: torch.Tensor, window: int, quantiles: tuple[float, ...]) -> list[float]:
    entropies = []
    with torch.no_grad():
        for s in range(0, ids.numel() - window + 1, window):
            entropies.append(next_token_stats(model(ids[None, s : s + window]).logits[0])[0])
    return torch.quantile(torch.cat(entropies), torch.tensor(quantiles)).tolist()


@click.command()
@click.option("--model", default=None)
@click.option("--tokens", default=8192, show_default=True)
@click.option("--window", default=512, show_default=True)
def main(model, tokens, window):
    hf, tok = load_model(model)
    ids = torch.tensor(tok.encode(load_text(calibration_path()), add_special_tokens=False)[:tokens])
    fr = RulePolicy().fractions
    qs = (fr[0], fr[0] + fr[1], fr[0] + fr[1] + fr[2])
    print("quantiles", qs, "thresholds", [round(x, 4) for x in rule_thresholds(hf, ids, window, qs)])


if __name__ == "__main__":
    main()
