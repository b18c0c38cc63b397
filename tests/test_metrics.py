"""itjax.metrics against hand-computed Super-NaturalInstructions scores."""

import pytest

from itjax import metrics


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat, sat!", "the cat sat"),  # lower-case, punctuation dropped, whitespace collapsed
        ("A dog and an apple", "a dog and an apple"),  # articles are kept (unlike SQuAD)
        ("  don't\tstop\n", "dont stop"),
        ("«Ça va?»", "«ça va»"),  # only ASCII string.punctuation is removed
        ("...", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_exact_match():
    assert metrics.exact_match("The answer.", "the answer") == 1.0
    assert metrics.exact_match("an apple", "apple") == 0.0  # articles count
    assert metrics.exact_match("yes", "Yes!") == 1.0
    assert metrics.exact_match("", "") == 1.0


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each way,
    # P = R = 5/6, F = 5/6.
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(0.8333333333)
    # Word order matters: LCS("dog cat", "cat dog") = 1 token, P = R = 1/2.
    assert metrics.rouge_l("dog cat", "cat dog") == pytest.approx(0.5)
    assert metrics.rouge_l("", "cat") == 0.0


def test_rouge_l_uses_the_porter_stemmer():
    # Tokens longer than 3 characters are stemmed: cats -> cat, running -> run, runs -> run ("are" is kept).
    # prediction [the, cat, are, run], reference [the, cat, run]: LCS 3, P = 3/4, R = 3/3,
    # F = 2 * 0.75 * 1 / 1.75 = 0.857142857...
    assert metrics.rouge_l("The cats are running.", "the cat runs") == pytest.approx(0.8571428571)


def test_rouge_l_xlingual_uses_whitespace_tokens():
    # The default tokenizer keeps only [a-z0-9]: non-Latin text has no tokens at all.
    assert metrics.rouge_l("猫 が 好き", "猫 が 好き") == 0.0
    assert metrics.rouge_l("猫 が 好き", "猫 が 好き", xlingual=True) == 1.0
    # No lower-casing or stemming on that path: "Die" != "die", LCS 1 of 2 -> F = 0.5.
    assert metrics.rouge_l("Die Katzen", "die Katzen", xlingual=True) == pytest.approx(0.5)


def test_max_over_references():
    refs = ["3", "three"]
    assert metrics.max_over_references(metrics.exact_match, "Three.", refs) == 1.0
    assert metrics.max_over_references(metrics.exact_match, "4", refs) == 0.0
    assert metrics.max_over_references(metrics.rouge_l, "three cats", refs) == pytest.approx(2 / 3)


def test_superni_metrics_averages_and_scales_to_100():
    targets = [["3", "three"], ["cat dog"], ["the cat is on the mat"]]
    predictions = ["three", "dog cat", "the cat sat on the mat"]
    result = metrics.superni_metrics(targets, predictions)
    # EM: 1 + 0 + 0 of 3 -> 33.3333.  ROUGE-L: (1 + 1/2 + 5/6) / 3 = 0.777777... -> 77.7778.
    assert result == {"exact_match": 33.3333, "rougeL": 77.7778}


def test_superni_metrics_accepts_a_bare_string_reference():
    assert metrics.superni_metrics(["yes", ("no",)], ["Yes", "no"]) == {"exact_match": 100.0, "rougeL": 100.0}


def test_grouped_metrics():
    result = metrics.compute_grouped_metrics(["a b", "x", "y"], [["a b"], ["x"], ["z"]], ["t1", "t2", "t2"])
    assert result == {
        "exact_match_for_t1": 100.0,
        "rougeL_for_t1": 100.0,
        "exact_match_for_t2": 50.0,
        "rougeL_for_t2": 50.0,
    }


def test_metric_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 reference"):
        metrics.compute_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="Example 0 has no reference"):
        metrics.compute_metrics(["a"], [[]])
