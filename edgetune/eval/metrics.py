"""Evaluation metrics: pure functions over plain numbers and arrays.

Every candidate is scored through two primitives, computed elsewhere (run_eval.py):
the summed log-probability of a completion's tokens given its prompt (with the
number of tokens), and a greedy generation. Everything below turns those into
the numbers the report shows, so each is tested on hand-worked values
(tests/test_eval_metrics.py).

Conventions: log-probs are natural logs; a loss is a mean negative log-prob per
supervised token (nats), as in training; suite scores are on a 0-100 scale
("points"), so "fell by 2 points" means the same for every suite type.
"""

from __future__ import annotations

import math
import re
from typing import Hashable, Sequence

import numpy as np

# exp() above this overflows float64; a loss this high means "nothing learned" anyway.
MAX_LOSS_FOR_PERPLEXITY = 50.0


def mean_token_loss(logp_sums: Sequence[float], counts: Sequence[float]) -> float:
    """Mean negative log-prob per token over rows: -sum(logp) / sum(tokens).

    Rows weigh by their token count (as the training loss does), not equally.
    Example: rows with logp sums [-2, -6] over [1, 3] tokens -> 8 / 4 = 2.0.
    NaN when there are no tokens.
    """
    total = float(np.sum(counts))
    return -float(np.sum(logp_sums)) / total if total > 0 else float("nan")


def perplexity(loss: float) -> float:
    """exp(loss); loss 2.0 -> 7.389. Capped at exp(50) so a diverged model still reports a number."""
    return float(math.exp(min(loss, MAX_LOSS_FOR_PERPLEXITY))) if not math.isnan(loss) else float("nan")


def preference_stats(chosen: Sequence[float], rejected: Sequence[float], chosen_tokens: Sequence[int],
                     rejected_tokens: Sequence[int]) -> dict:
    """Accuracy and mean margin over held-out preference pairs, per token, without a reference model.

    Each side is its mean token log-prob (summed log-prob / tokens): a chosen
    answer is often the longer one, and summed log-probs would count every
    extra token against it. A pair counts as right when chosen is strictly more
    likely per token (a tie is not a preference); margin = mean(chosen -
    rejected), nats per token. Example: chosen sums [-2, -6] over [2, 3] tokens
    (-1, -2 per token), rejected [-3, -1] over [1, 1] (-3, -1) -> accuracy 1/2,
    margin ((-1 + 3) + (-2 + 1)) / 2 = 0.5.
    """
    c = np.asarray(chosen, np.float64) / np.maximum(np.asarray(chosen_tokens, np.float64), 1)
    r = np.asarray(rejected, np.float64) / np.maximum(np.asarray(rejected_tokens, np.float64), 1)
    if c.shape != r.shape:
        raise ValueError(f"chosen and rejected differ in length: {c.shape} vs {r.shape}")
    if not len(c):
        return {"pairs": 0, "accuracy": None, "margin": None}
    return {"pairs": int(len(c)), "accuracy": float(np.mean(c > r)), "margin": float(np.mean(c - r))}


def reward_stats(chosen: Sequence[float], rejected: Sequence[float], chosen_base: Sequence[float],
                 rejected_base: Sequence[float]) -> dict:
    """DPO's implicit-reward accuracy and margin against the base (beta = 1), over summed log-probs.

    reward(side) = logp_candidate(side) - logp_base(side); a pair is right when
    reward(chosen) > reward(rejected): tuning moved probability toward the chosen
    answer relative to the rejected one. Length cancels, since each side is
    compared with itself under the base. Example: chosen [-4, -6], rejected
    [-9, -5], base chosen [-5, -6], base rejected [-8, -5] -> rewards chosen
    [1, 0], rejected [-1, 0] -> accuracy 1/2 (the tie is not right), margin (2 + 0) / 2 = 1.
    """
    c = np.asarray(chosen, np.float64) - np.asarray(chosen_base, np.float64)
    r = np.asarray(rejected, np.float64) - np.asarray(rejected_base, np.float64)
    if not len(c):
        return {"accuracy": None, "margin": None}
    return {"accuracy": float(np.mean(c > r)), "margin": float(np.mean(c - r))}


def less_likely_share(candidate: Sequence[float], base: Sequence[float], tol: float = 1e-4) -> float | None:
    """Share of completions whose log-prob under `candidate` is below the base's by more than `tol` nats.

    Used on held-out thumbs-down completions: the share the tuned model now finds
    less likely. `tol` keeps float noise between two loads of the same weights
    from counting as a change. Example: candidate [-5, -2, -3.00001], base
    [-4, -2, -3] -> only the first moved by more than 1e-4 -> 1/3. None when empty.
    """
    c, b = np.asarray(candidate, np.float64), np.asarray(base, np.float64)
    if c.shape != b.shape:
        raise ValueError(f"candidate and base differ in length: {c.shape} vs {b.shape}")
    return float(np.mean(c < b - tol)) if len(c) else None


# --- regression suites ----------------------------------------------------------------------------

_SPACE = re.compile(r"\s+")
_TRAILING = ".!?;:,"


def normalize_answer(text: str, case_sensitive: bool = False) -> str:
    """Whitespace collapsed, outer quotes/backticks and trailing sentence punctuation dropped, and
    case-folded unless `case_sensitive`.

    So "  The Answer is 42. " and "the answer is 42" compare equal, while "42" and "42.5" do not.
    """
    t = _SPACE.sub(" ", text).strip()
    t = t if case_sensitive else t.casefold()
    t = t.rstrip(_TRAILING).strip()
    while len(t) >= 2 and t[0] == t[-1] and t[0] in "\"'`":
        t = t[1:-1].strip()
    return t


def exact_match(prediction: str, answers: Sequence[str], case_sensitive: bool = False) -> bool:
    """The normalised prediction equals one of the normalised answers."""
    p = normalize_answer(prediction, case_sensitive)
    return any(p == normalize_answer(a, case_sensitive) for a in answers)


def contains_match(prediction: str, answers: Sequence[str], case_sensitive: bool = False) -> bool:
    """One normalised answer appears in the normalised prediction as whole words.

    Whole words: "42" is found in "the sum is 42." but not in "142" or "4,242".
    """
    p = normalize_answer(prediction, case_sensitive)
    for a in answers:
        a = normalize_answer(a, case_sensitive)
        if a and re.search(rf"(?<![\w,.]){re.escape(a)}(?![\w]|[,.]\w)", p):
            return True
    return False


def choice_correct(choice_logps: Sequence[float], answer: int) -> bool:
    """Multiple choice by log-likelihood: right when the answer's log-prob is strictly the highest.

    Summed (not length-normalised) log-probs, as lm-evaluation-harness's `acc`.
    A tie with another choice is wrong: the model did not pick it.
    """
    lp = np.asarray(choice_logps, np.float64)
    others = np.delete(lp, answer)
    return bool(len(others) == 0 or lp[answer] > others.max())


def answer_probability(logp_sum: float, n_tokens: int) -> float:
    """Per-token probability of a reference answer: exp(mean token log-prob), in (0, 1].

    The geometric mean of the token probabilities; an answer of 2 tokens with
    log-probs summing to -1.386 scores exp(-0.693) = 0.5.
    """
    return float(math.exp(logp_sum / n_tokens)) if n_tokens else float("nan")


def suite_score(item_scores: Sequence[float]) -> float | None:
    """Mean item score (each in [0, 1]: right/wrong or a probability) on the 0-100 scale."""
    return 100.0 * float(np.mean(item_scores)) if len(item_scores) else None


def group_indices(labels: Sequence[Hashable]) -> dict:
    """{label: [positions]} in first-seen order; the persona and category slices are built from it."""
    out: dict = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return out
