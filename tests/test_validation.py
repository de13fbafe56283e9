"""rnip_ext._validation: the shared argument checks and their messages."""

import math

import pytest

from rnip_ext._validation import check_fraction, check_int, check_number, describe_range, is_int, is_number


def test_bool_is_neither_an_int_nor_a_number():
    assert is_int(3) and not is_int(True) and not is_int(3.0) and not is_int("3")
    assert is_number(0.5) and is_number(2) and not is_number(False) and not is_number("1")
    assert not is_number(math.inf) and is_number(math.inf, finite=False) and not is_number(math.nan)


@pytest.mark.parametrize("args, text", [
    ((1,), ">= 1"), ((0, None, True), "> 0"), ((None, 1, False, True), "< 1"), ((None, 1), "<= 1"),
    ((0, 1, True, False), "in (0, 1]"), ((0, 1, False, True), "in [0, 1)"), ((), ""),
])
def test_describe_range(args, text):
    low, high, low_open, high_open = (args + (None, None, False, False)[len(args):])
    assert describe_range(low, high, low_open=low_open, high_open=high_open) == text


def test_check_int_returns_the_value_and_names_the_argument():
    assert check_int("epochs", 3, 1) == 3
    for bad in (0, True, 2.0, "2"):
        with pytest.raises(ValueError, match=rf"^epochs must be an int >= 1, got {bad!r}$"):
            check_int("epochs", bad, 1)
    with pytest.raises(ValueError, match=r"^depth must be an int in \[1, 4\], got 5$"):
        check_int("depth", 5, 1, 4)


def test_check_number_and_fraction():
    assert check_number("lr", 1, 0) == 1.0 and isinstance(check_number("lr", 1, 0), float)
    for bad in (-0.1, math.nan, math.inf, True, "1"):
        with pytest.raises(ValueError, match=r"^lr must be a finite number >= 0, got "):
            check_number("lr", bad, 0)
    with pytest.raises(ValueError, match=r"^headroom must be a finite number > 1, got 1$"):
        check_number("headroom", 1, 1, low_open=True)
    assert check_fraction("target", 1.0) == 1.0
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match=r"^target must be a finite number in \(0, 1\], got "):
            check_fraction("target", bad)
