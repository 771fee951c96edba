"""Answer equivalence against the public graders' rules: one row per (answer, gold, expected).

Tags name the public graders whose rules decide the row the same way (docs/evaluation.md, "Grader: answer
equivalence"): H hendrycks ``math_equivalence``, N NeMo-Skills ``math_grader``, Q Qwen2.5-Math
``evaluation/grader.py`` (AReaL's math parser is derived from it), V verl ``math.py``, D verl ``math_dapo.py``
(Minerva normalisation), M Math-Verify. ``DISAGREEMENTS`` holds the rows where they split; its third field is
the side we take, and docs/evaluation.md's "Disagreements" table gives the reason for each.
"""

import pytest

from rewards import math as math_grader

ACCEPT = [
    # LaTeX wrappers
    (r"\dfrac{1}{2}", r"\frac{1}{2}", "HNQVDM"),
    (r"\tfrac{3}{4}", r"\frac{3}{4}", "HNQVDM"),
    (r"\dfrac{\pi}{3}", r"\frac{\pi}3", "HNQVM"),
    (r"\left( 1, 2 \right)", "(1,2)", "HNQVM"),
    (r"(3, \pi/2)", r"\left( 3, \frac{\pi}{2} \right)", "NQM"),
    (r"\left[ 0, 1 \right)", "[0,1)", "HNQVM"),
    (r"\text{Evelyn}", "Evelyn", "NQDM"),
    (r"\mathrm{B}", r"\text{B}", "NQM"),
    (r"\textbf{7}", "7", "NQM"),
    (r"\text{east}", "east", "NQDM"),
    (r"\mbox{yes}", "yes", "NQM"),
    # matrix environments
    (r"\begin{bmatrix}1&2\\3&4\end{bmatrix}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}", "QM"),
    (r"\begin{pmatrix}1\\2\end{pmatrix}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}", "HNQVM"),
    (r"\begin{pmatrix}0.5\\2\end{pmatrix}", r"\begin{pmatrix}\frac12\\2\end{pmatrix}", "QM"),
    # currency
    (r"\$18.90", "18.90", "HNQVDM"),
    ("18.90", r"\$18.90", "HNQVDM"),
    (r"\$5", "5", "HNQVDM"),
    (r"5\text{ dollars}", "5", "HVDM"),
    ("5 dollars", "5", "D"),
    (r"\$1,234.50", "1234.5", "QM"),
    # shorthand
    (r"\sqrt3", r"\sqrt{3}", "HNQVDM"),
    (r"\frac34", r"\frac{3}{4}", "HNQVDM"),
    (r"\frac{\sqrt3}2", r"\frac{\sqrt{3}}{2}", "HNQVDM"),
    (r"\frac1{10}", "0.1", "NQM"),
    # factored vs expanded, algebraic forms
    (r"x^2+2x+1", r"(x+1)^2", "NQM"),
    (r"(x+1)(x-1)", r"x^2-1", "NQM"),
    (r"-q+p", "p - q", "NQM"),
    (r"2\sqrt{2}", r"\sqrt{8}", "NQM"),
    (r"3\sqrt{2}", r"\sqrt{18}", "NQM"),
    (r"\sqrt{117}", r"3\sqrt{13}", "NQM"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", "NQM"),
    (r"\frac{2}{4}", r"\frac{1}{2}", "NQM"),
    (r"2x+3", r"3+2x", "NQM"),
    (r"\frac{x}{2}", r"0.5x", "NQM"),
    (r"\frac{6}{8}", r"\frac34", "NQM"),
    # golds written as a phrase, units
    ("5", "5 apples", "DM"),
    ("5", r"\text{5 apples}", "D"),
    ("3", "3 hours", "DM"),
    ("12", r"12\text{ inches}", "HVDM"),
    ("12", r"12\text{ square units}", "HVDM"),
    ("12 square units", "12", "DM"),
    (r"5\text{ cm}", "5", "HVDM"),
    ("5 meters", "5", "DM"),
    (r"90^\circ", "90", "HNQVDM"),
    (r"90^{\circ}", "90", "HNQVDM"),
    (r"\text{Monday}", "Monday", "NQDM"),
    # numbers
    ("1,000", "1000", "QDM"),
    (r"1{,}000", "1000", "DM"),
    (r"1\,000", "1000", "DM"),
    (".5", r"\frac12", "HNQM"),
    ("0.5", r"\frac{1}{2}", "HNQM"),
    ("1/2", "0.5", "NQM"),
    (r"1.5", r"\frac32", "NQM"),
    (r"0.333333", r"\frac13", "QM"),
    (r"10\%", "0.1", "QM"),
    ("0.1", r"10\%", "QM"),
    (r"50\%", r"50\%", "HNQVDM"),
    (r"10^{10}", "10000000000", "NQM"),
    (r"1\times10^3", "1000", "NQM"),
    ("1e3", "1000", "Q"),
    ("-3", "-3.0", "NQM"),
    ("7.", "7", "NQM"),
    # equations, variables
    ("x=5", "5", "HNQM"),
    ("k = 7", "7", "HNQVM"),
    ("y = 2x+3", "2x+3", "QM"),
    ("a=2, b=3", "2, 3", "M"),
    # sets, intervals, tuples
    (r"\{1,2\}", "1,2", "NQM"),
    ("2,1", "1,2", "NM"),
    (r"\{2, 1\}", r"\{1,2\}", "NQM"),
    (r"(-\infty, 3]", r"(-\infty,3]", "HNQVDM"),
    (r"x \in [2, 5)", "[2,5)", "NM"),
    (r"(0,1] \cup [2,3)", r"(0,1]\cup[2,3)", "HNQVDM"),
    (r"\infty", r"\infty", "HNQVDM"),
    # multiple choice and words
    ("(B)", "B", "NQM"),
    (r"\text{(B)}", "B", "NQM"),
    (r"\textbf{(C)}", "C", "NQM"),
    (r"\text{yes}", "Yes", "NQM"),
    ("monday", "Monday", "M"),
    (r"\pi", r"\pi", "HNQVDM"),
    (r"\frac{\pi}{2}", r"\dfrac{\pi}{2}", "HNQVDM"),
]

REJECT = [
    ("6", "5", "HNQVDM"),
    (r"\frac{1}{2}", r"\frac{1}{3}", "HNQVDM"),
    ("[0,1]", "(0,1]", "HNVDM"),
    ("(2,1)", "(1,2)", "HNQVDM"),
    ("0.33", r"\frac13", "HNVDM"),
    ("0.1", "10", "HNVDM"),
    ("1000", "10", "HNVDM"),
    ("50", "0.5", "HNVDM"),
    ("A", "B", "HNQVDM"),
    ("no", "yes", "HNQVDM"),
    (r"x^2", "x^3", "HNQVDM"),
    (r"\sqrt{2}", "1.41", "HNVDM"),
    ("3.14", r"\pi", "HNVDM"),
    (r"2^{2^{3}}", "255", "HNQVDM"),
    ("1,2", "12", "HNQVDM"),
    ("5", r"5\sqrt{2}", "HNQVDM"),
    (r"(1,2)", r"\{1,2,3\}", "HNQVDM"),
    ("", "5", "HNQVDM"),
    (r"10^{10^{10^{10}}}", "1", "HNQVDM"),
]

# (answer, gold, expected, who accepts): the graders split on these; docs/evaluation.md says why we side as we do
DISAGREEMENTS = [
    ("1e3", "1000", True, "Q"),  # calculator notation is a number to Qwen's float parsing; Math-Verify reads e
    ("5 dollars", "5", True, "D"),  # Minerva/DAPO strip unit words; Math-Verify reads "dollars" as symbols
    (r"x^2-1", "(x-1)(x+1)", True, "NQM"),  # factored vs expanded: the grader sees no "factor" instruction
    ("0.1", "10", False, "Q"),  # Qwen's include_percentage also accepts x/100 and 100x: 0.1 is not 10
    ("[0,1]", "(0,1]", False, "Q"),  # Qwen compares interval contents element-wise, ignoring brackets
    ("3.14", r"\pi", False, "Q"),  # Qwen's numeric tolerance (rel 1e-3 symbolic, 1e-4 numeric) accepts approximations
    ("0.3333", r"\frac13", False, "Q"),  # likewise: 4 decimals are not 1/3 (Math-Verify rounds at 6)
    ("2,1", "1,2", True, "NM"),  # a bare comma list is the set of solutions; Qwen compares it as a tuple
    ("monday", "Monday", True, "M"),  # case of a word answer; hendrycks/verl compare strings exactly
    ("0.5", r"50\%", True, "QM"),  # NeMo-Skills drops the % and compares 0.5 with 50; 50% is 0.5
]


def test_the_table_is_large_enough():
    assert len(ACCEPT) + len(REJECT) >= 80


@pytest.mark.parametrize(("answer", "gold", "graders"), ACCEPT)
def test_equivalent_forms_are_accepted(answer, gold, graders):
    assert math_grader.equivalent(answer, gold)


@pytest.mark.parametrize(("answer", "gold", "graders"), REJECT)
def test_different_answers_are_rejected(answer, gold, graders):
    assert not math_grader.equivalent(answer, gold)


@pytest.mark.parametrize(("answer", "gold", "expected", "accepted_by"), DISAGREEMENTS)
def test_disagreements_take_the_documented_side(answer, gold, expected, accepted_by):
    assert math_grader.equivalent(answer, gold) is expected


def test_equivalent_reads_a_completion_with_a_box_too():
    assert math_grader.equivalent(r"so the answer is $\boxed{\dfrac12}$", "0.5")
    assert not math_grader.equivalent("   ", "0")
