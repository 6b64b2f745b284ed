"""Grammar: parsing, printing, round trips and bad input."""
import random

import pytest

from prunerzero import DegenerateMetricError, Metric, MetricSyntaxError
from prunerzero.language.text import parse, to_sympy, to_text

from helpers import random_expr


@pytest.mark.parametrize("infix, function", [
    ("abs(W) * sqrt(X)", "mul(abs(W), sqrt(X))"),
    ("W + G - X", "sub(add(W, G), X)"),
    ("W / X / G", "div(div(W, X), G)"),
    ("-W * 2", "mul(neg(W), 2)"),
    ("W ** 2", "sqr(W)"),
    ("W ** 0.5", "sqrt(W)"),
    ("W ** -1", "div(1, W)"),
])
def test_infix_and_function_forms_agree(infix, function):
    assert to_sympy(parse(infix)) == to_sympy(parse(function))


def test_parsed_tree_prints_in_function_form():
    assert str(parse("abs(W) * X + 0.5")) == "add(mul(abs(W), X), 0.5)"


def test_numbers_are_exact():
    assert to_text(to_sympy(parse("0.1 * W + 0.2 * W"))) == "0.3*W"
    assert to_text(to_sympy(parse("W ** (1/3)"))) == "abs(W)**(1/3)"


def test_printing_round_trips_on_random_metrics():
    rng = random.Random(1)
    for _ in range(1000):
        text = random_expr(rng, 4)
        e = to_sympy(parse(text))
        printed = to_text(e)
        assert to_sympy(parse(printed)) == e, (text, printed)


def test_catalog_names_are_accepted():
    assert Metric.parse("wanda") == Metric.parse("abs(W) * X")
    assert Metric.parse("pruner-zero").name == "pruner-zero"


@pytest.mark.parametrize("text, fragment", [
    ("", "empty metric"),
    ("   ", "empty metric"),
    ("foo(W)", "unknown operator 'foo'"),
    ("Q * X", "unknown terminal 'Q'"),
    ("w * X", "did you mean 'W'"),
    ("mms(W, G)", "mms() takes 1 argument, got 2"),
    ("add(W)", "add() takes 2 arguments, got 1"),
    ("abs(W", "unbalanced parentheses"),
    ("abs(W))", "unbalanced parentheses"),
    ("abs(x=W)", "takes no keyword arguments"),
    ("abs(W, x=1)", "takes no keyword arguments"),
    ("W.T", "unsupported syntax"),
    ("W if X else G", "unsupported syntax"),
    ("'W'", "only real numbers"),
    ("W % X", "not part of the metric language"),
    ("W ** X", "exponent of ** must be a number"),
    ("sqrt * W", "is an operator"),
])
def test_bad_input_gets_a_clear_error(text, fragment):
    with pytest.raises(MetricSyntaxError) as err:
        Metric.parse(text)
    assert fragment in str(err.value)


def test_errors_point_at_the_column():
    with pytest.raises(MetricSyntaxError) as err:
        Metric.parse("abs(W) * foo(X)")
    assert err.value.col == 9
    assert str(err.value).splitlines()[-1] == " " * (2 + 9) + "^"


@pytest.mark.parametrize("text, fragment", [
    ("3", "is constant"),
    ("W - W", "is constant"),
    ("X * G", "does not depend on W"),
    ("sub(W, W) + X", "does not depend on W"),
    ("rowsum(abs(W)) + 1", "constant along each output row"),
])
def test_degenerate_metrics_are_refused(text, fragment):
    with pytest.raises(DegenerateMetricError) as err:
        Metric.parse(text)
    assert fragment in str(err.value)
