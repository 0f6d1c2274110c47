"""Paired statistics: Wilson intervals, the exact McNemar test, per-item outcomes in eval results, and
``compare`` on two eval files; every number against a hand computation or a brute-force count."""
from __future__ import annotations

import itertools
import json
import math

import pytest

from vlmprune.errors import VlmpruneError
from vlmprune.eval import harness
from vlmprune.eval.compare import compare, run_compare
from vlmprune.eval.statistics import (compare_outcomes, compare_pooled, mcnemar_exact, mean_interval,
                                      outcome_bits, wilson_interval)


@pytest.mark.parametrize("hits, n, low, high", [
    (8, 10, 0.490162, 0.943318),    # centre (0.8 + z^2/20) / (1 + z^2/10), half-width by hand, z = 1.959964
    (0, 10, 0.0, 0.277533),         # z^2 / (n + z^2)
    (10, 10, 0.722467, 1.0),        # n / (n + z^2)
    (1, 2, 0.094531, 0.905469),     # centre 1/2, half z / (1 + z^2/2) * sqrt(1/8 + z^2/16)
])
def test_wilson_interval_matches_hand_computation(hits, n, low, high):
    assert wilson_interval(hits / n, n) == pytest.approx((low, high), abs=2e-6)


def test_wilson_interval_stays_in_the_unit_interval_and_holds_the_estimate():
    for n in (1, 3, 10, 57):
        for hits in range(n + 1):
            low, high = wilson_interval(hits / n, n)
            assert 0.0 <= low <= hits / n <= high <= 1.0 and high - low > 0
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


def test_mean_interval_uses_the_effective_number_of_items():
    # equal sizes: exactly the Wilson interval of all items pooled (13 + 7 hits of 40)
    assert mean_interval([13 / 20, 7 / 20], [20, 20]) == pytest.approx(wilson_interval(20 / 40, 40))
    # sizes 10 and 40: the mean weighs an item of the small task 4x; Kish's n = 2^2 / (1/10 + 1/40) = 32
    assert mean_interval([0.5, 0.8], [10, 40]) == pytest.approx(wilson_interval(0.65, 32))


def binomial_terms(n: int, k: int) -> float:
    """P[X <= k], X ~ Bin(n, 1/2), summed term by term in floating point through log-gamma."""
    return sum(math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
               for i in range(k + 1))


def test_mcnemar_exact_against_hand_computation():
    # 2 * (C(35,0) + C(35,1) + C(35,2)) / 2^35 = 2 * 631 / 2^35
    assert mcnemar_exact(33, 2) == pytest.approx(2 * binomial_terms(35, 2), rel=1e-9)
    assert mcnemar_exact(33, 2) == pytest.approx(3.6729e-8, rel=1e-4)
    assert mcnemar_exact(5, 0) == 0.0625          # 2 / 2^5
    assert mcnemar_exact(0, 5) == 0.0625
    assert mcnemar_exact(7, 7) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(0.03125)
    assert mcnemar_exact(9, 3) == pytest.approx(2 * binomial_terms(12, 3), rel=1e-9)   # 0.146


def test_mcnemar_exact_equals_the_brute_force_count_of_sign_patterns():
    """Every assignment of the discordant items to A or B is equally likely under the null; p is the share
    of them at least as lopsided as the one observed."""
    for total in range(11):
        patterns = list(itertools.product((0, 1), repeat=total))
        for b in range(total + 1):
            c = total - b
            extreme = sum(1 for pattern in patterns if min(sum(pattern), total - sum(pattern)) <= min(b, c))
            assert mcnemar_exact(b, c) == pytest.approx(extreme / len(patterns), abs=1e-12), (b, c)


def test_compare_outcomes_counts_discordant_pairs_and_names_the_better_method():
    a = "1" * 14 + "111111" + "0000"
    b = "1" * 14 + "000000" + "0000"
    result = compare_outcomes(a, b)
    assert (result["n"], result["b"], result["c"]) == (24, 6, 0)
    assert result["accuracy_a"] == pytest.approx(20 / 24) and result["accuracy_b"] == pytest.approx(14 / 24)
    assert result["interval_a"] == pytest.approx(list(wilson_interval(20 / 24, 24)))
    assert result["p"] == pytest.approx(0.03125) and result["verdict"] == "A better (p=0.0312)"
    swapped = compare_outcomes(b, a)
    assert (swapped["b"], swapped["c"], swapped["verdict"]) == (0, 6, "B better (p=0.0312)")
    close = compare_outcomes("1100", "1010")        # b = c = 1
    assert (close["b"], close["c"], close["p"], close["verdict"]) == (1, 1, 1.0, "not significant (p=1)")
    assert compare_outcomes("11111", "00000")["verdict"] == "not significant (p=0.0625)"
    with pytest.raises(VlmpruneError, match="same items"):
        compare_outcomes("101", "10")
    with pytest.raises(VlmpruneError, match="0 or 1"):
        outcome_bits("1x0")


def test_pooled_comparison_concatenates_tasks_in_the_given_order():
    a = {"x": "110", "y": "1111"}
    b = {"y": "0001", "x": "011"}         # another file may list the tasks in another order
    pooled = compare_pooled(a, b, ["x", "y"])
    assert pooled == compare_outcomes("110" + "1111", "011" + "0001")
    assert (pooled["b"], pooled["c"]) == (3 + 1, 0 + 1)


class Item:
    def __init__(self, answer, options=None):
        self.answer, self.options = answer, options


def test_score_records_each_items_outcome_in_split_order():
    items = {"count": [Item("3"), Item("two"), Item("5")],
             "choice": [Item("b", ["red", "blue", "green"]), Item("a", ["red", "blue"])],
             "yesno": [Item("yes"), Item("no"), Item("no"), Item("yes")]}
    replies = ["three", "2", "four",          # right, right, wrong
               "blue", "B",                   # right (the option's text), wrong (the other letter)
               "no", "No.", "yes", "Yes"]     # wrong, right, wrong, right
    tasks = harness.score(items, replies)
    assert {t: e["correct"] for t, e in tasks.items()} == {"count": "110", "choice": "10", "yesno": "0101"}
    for entry in tasks.values():
        assert entry["accuracy"] == entry["correct"].count("1") / entry["n"]
        assert entry["interval"] == pytest.approx(list(wilson_interval(entry["accuracy"], entry["n"])))
    assert harness.average_interval(tasks) == pytest.approx(
        list(mean_interval([2 / 3, 1 / 2, 2 / 4], [3, 2, 4])))


def write_result(path, tasks: dict[str, str], model="toy-large", tokens=None) -> str:
    """An eval --json file whose tasks hold these outcome strings."""
    entries = {task: {"accuracy": correct.count("1") / len(correct), "n": len(correct), "correct": correct}
               for task, correct in tasks.items()}
    path.write_text(json.dumps({"model": model, "tokens": tokens, "tasks": entries}))
    return str(path)


def test_compare_two_eval_files_per_task_and_pooled(tmp_path, capsys):
    dense = write_result(tmp_path / "a.json", {"existence": "1" * 30 + "0" * 5, "counting": "1100110011"})
    pruned = write_result(tmp_path / "b.json", {"counting": "1000110011", "existence": "0" * 33 + "1" * 2},
                          tokens="ivtp:keep=16")
    result = compare(dense, pruned)
    existence, counting, pooled = result["tasks"]["existence"], result["tasks"]["counting"], result["pooled"]
    assert list(result["tasks"]) == ["existence", "counting"]       # A's order
    assert (existence["b"], existence["c"]) == (30, 2)
    assert existence["p"] == pytest.approx(2 * binomial_terms(32, 2), rel=1e-9)
    assert existence["verdict"].startswith("A better")
    assert (counting["b"], counting["c"], counting["verdict"]) == (1, 0, "not significant (p=1)")
    assert (pooled["n"], pooled["b"], pooled["c"]) == (45, 31, 2)
    assert pooled["accuracy_a"] == pytest.approx(36 / 45) and pooled["accuracy_b"] == pytest.approx(7 / 45)
    assert pooled["p"] == pytest.approx(2 * binomial_terms(33, 2), rel=1e-9)
    assert result["b"]["label"] == "toy-large + ivtp:keep=16"

    out = tmp_path / "compare.json"
    assert run_compare(dense, pruned, str(out)) == 0
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    table = capsys.readouterr().out.splitlines()
    assert "| existence | 35 | 85.7 [70.6, 93.7] | 5.7 [1.6, 18.6] | 30 | 2 | A better (p=2.46e-07) |" in table
    assert table[-1].startswith("| all tasks (pooled) | 45 | 80.0 ")


def test_compare_refuses_files_that_do_not_pair_up(tmp_path):
    a = write_result(tmp_path / "a.json", {"x": "1100", "y": "10"})
    other_task = write_result(tmp_path / "b.json", {"x": "1100", "z": "10"})
    other_size = write_result(tmp_path / "c.json", {"x": "110", "y": "10"})
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"tasks": {"x": {"accuracy": 0.5, "n": 4}, "y": {"accuracy": 0.5, "n": 2}}}))
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps({"tasks": {"x": {"accuracy": 0.5, "n": 4, "correct": "110"}}}))
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    for other, message in [(other_task, "same tasks"), (other_size, "'x' has 4 items .* same --limit"), (old, "no per-item outcomes"),
                           (cut, "3 outcomes for n=4"), (garbage, "not a readable"),
                           (tmp_path / "missing.json", "not a readable")]:
        with pytest.raises(VlmpruneError, match=message) as error:
            compare(a, str(other))
        assert "\n" not in str(error.value)
