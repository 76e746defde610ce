"""edgetune.eval.metrics on hand-worked numbers (the arithmetic is in each test's comments)."""

import math

import numpy as np
import pytest

from edgetune.eval import metrics as M


def test_mean_token_loss_weighs_rows_by_their_tokens():
    # Rows: logp sums -2 over 1 token, -6 over 3 tokens -> 8 nats / 4 tokens = 2.0 (not the row mean 2 + 2 = ...).
    assert M.mean_token_loss([-2.0, -6.0], [1, 3]) == pytest.approx(2.0)
    # -1 over 1 and -9 over 1 -> 5.0; the per-row means (1 and 9) average to 5 too only because counts match.
    assert M.mean_token_loss([-1.0, -9.0], [1, 1]) == pytest.approx(5.0)
    assert math.isnan(M.mean_token_loss([], []))


def test_perplexity_is_exp_loss_and_capped():
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(2.0) == pytest.approx(7.389056)
    assert M.perplexity(1e6) == pytest.approx(math.exp(50.0))  # a diverged model still gives a number
    assert math.isnan(M.perplexity(float("nan")))


def test_preference_stats_compare_per_token_log_probs():
    # chosen: -2 over 2 tokens = -1/token, -6 over 3 = -2/token; rejected: -3 over 1 = -3, -1 over 1 = -1.
    # pair 1: -1 > -3 right (margin +2); pair 2: -2 < -1 wrong (margin -1) -> accuracy 0.5, margin 0.5.
    s = M.preference_stats([-2.0, -6.0], [-3.0, -1.0], [2, 3], [1, 1])
    assert s == {"pairs": 2, "accuracy": 0.5, "margin": pytest.approx(0.5)}
    # A long chosen answer is not penalised for its length: -4 over 4 tokens (-1/token) beats -3 over 1 token,
    # although its summed log-prob is lower (-4 < -3).
    assert M.preference_stats([-4.0], [-3.0], [4], [1])["accuracy"] == 1.0
    # A tie is not a preference:
    assert M.preference_stats([-2.0], [-2.0], [1], [1])["accuracy"] == 0.0
    assert M.preference_stats([], [], [], []) == {"pairs": 0, "accuracy": None, "margin": None}


def test_reward_stats_measure_movement_against_the_base():
    # rewards: chosen (-4 - -5, -6 - -6) = (1, 0); rejected (-9 - -8, -5 - -5) = (-1, 0)
    # pair 1: 1 > -1 right (margin 2); pair 2: 0 == 0 tie, not right (margin 0) -> accuracy 0.5, margin 1.
    s = M.reward_stats([-4.0, -6.0], [-9.0, -5.0], [-5.0, -6.0], [-8.0, -5.0])
    assert s == {"accuracy": 0.5, "margin": pytest.approx(1.0)}
    assert M.reward_stats([], [], [], []) == {"accuracy": None, "margin": None}


def test_less_likely_share_ignores_float_noise():
    # -5 < -4 - 1e-4: yes; -2 vs -2: no; -3.00001 vs -3: moved by 1e-5 < tol: no -> 1/3.
    assert M.less_likely_share([-5.0, -2.0, -3.00001], [-4.0, -2.0, -3.0]) == pytest.approx(1 / 3)
    assert M.less_likely_share([-5.0], [-4.0], tol=2.0) == 0.0
    assert M.less_likely_share([], []) is None
    with pytest.raises(ValueError):
        M.less_likely_share([1.0], [1.0, 2.0])


@pytest.mark.parametrize("text, normal", [
    ("  The Answer is 42. ", "the answer is 42"),
    ("\"Blue\"", "blue"),
    ("`yes`!", "yes"),
    ("a\n\tb", "a b"),
    ("42.5", "42.5"),
])
def test_normalize_answer(text, normal):
    assert M.normalize_answer(text) == normal


def test_exact_match_and_case_sensitivity():
    assert M.exact_match("Paris.", ["paris"])
    assert M.exact_match("12", ["twelve", "12"])
    assert not M.exact_match("Paris, France", ["Paris"])
    assert M.exact_match("hello", ["HELLO"])
    assert not M.exact_match("hello", ["HELLO"], case_sensitive=True)
    assert M.exact_match("HELLO.", ["HELLO"], case_sensitive=True)


@pytest.mark.parametrize("prediction, found", [
    ("The sum is 42.", True),
    ("42", True),
    ("It is 142.", False),
    ("4,242 in total", False),
    ("42.5 exactly", False),
    ("forty-two, or 42, is it", True),
])
def test_contains_match_finds_whole_words_only(prediction, found):
    assert M.contains_match(prediction, ["42"]) is found


def test_contains_match_any_answer_and_case():
    assert M.contains_match("The capital is Tokyo, Japan.", ["Kyoto", "tokyo"])
    assert not M.contains_match("the symbol is au", ["Au"], case_sensitive=True)
    assert M.contains_match("The symbol is Au.", ["Au"], case_sensitive=True)


def test_choice_correct_needs_a_strict_maximum():
    assert M.choice_correct([-3.0, -1.0, -2.0], 1)
    assert not M.choice_correct([-3.0, -1.0, -2.0], 2)
    assert not M.choice_correct([-1.0, -1.0], 0)  # a tie: the model did not pick it


def test_answer_probability_is_the_geometric_mean_token_probability():
    # two tokens, log-probs summing to 2 * ln(0.5) -> exp(ln 0.5) = 0.5
    assert M.answer_probability(2 * math.log(0.5), 2) == pytest.approx(0.5)
    assert M.answer_probability(0.0, 3) == 1.0
    assert math.isnan(M.answer_probability(-1.0, 0))


def test_suite_score_is_a_percentage_of_the_mean():
    assert M.suite_score([1.0, 0.0, 1.0, 0.0]) == 50.0
    assert M.suite_score([0.5, 0.25]) == pytest.approx(37.5)
    assert M.suite_score([]) is None


def test_group_indices_keeps_first_seen_order():
    assert M.group_indices(["b", "a", "b", None]) == {"b": [0, 2], "a": [1], None: [3]}
    assert list(M.group_indices(np.array([3, 1, 3]).tolist())) == [3, 1]
