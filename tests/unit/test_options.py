"""One validation helper: kinds, bounds, choices and None, with the accepted range in the message."""

import math

import pytest

from distopt.core.options import check_option


@pytest.mark.parametrize("value,kwargs", [
    (3, dict(kind="int", low=1)), (0, dict(kind="int", low=0)), (0.5, dict(low=0, low_open=True, high=1)),
    (1, dict(low=0, low_open=True, high=1)), (math.inf, dict(low=1, high=math.inf)), (True, dict(kind="bool")),
    ("svd", dict(kind="choice", choices=("svd", "randomized"))), (None, dict(kind="int", low=1, optional="for auto")),
])
def test_accepted(value, kwargs):
    check_option({"x": value}, "x", **kwargs)


@pytest.mark.parametrize("value,kwargs,message", [
    (0, dict(kind="int", low=1), "x=0: must be an integer >= 1"),
    (2.0, dict(kind="int", low=1), "x=2.0: must be an integer >= 1"),
    (True, dict(kind="int", low=1), "x=True: must be an integer >= 1"),
    (True, dict(low=0), "x=True: must be a finite number >= 0"),
    (0, dict(low=0, low_open=True, high=1), r"x=0: must be a finite number in \(0, 1\]"),
    (1.5, dict(low=0, low_open=True, high=1, note="e.g. 0.05"), r"in \(0, 1\] \(e.g. 0.05\)"),
    (math.nan, dict(low=0), "x=nan: must be a finite number >= 0"),
    (math.inf, dict(low=0), "x=inf: must be a finite number >= 0"),
    (math.nan, dict(low=1, high=math.inf), r"x=nan: must be a number in \[1, inf\]"),
    ("yes", dict(kind="bool"), "x='yes': must be True or False"),
    ("qr", dict(kind="choice", choices=("svd",)), r"x='qr': must be one of \('svd',\)"),
    (0, dict(kind="int", low=1, optional="for auto"), "x=0: must be an integer >= 1, or None for auto"),
    (None, dict(kind="int", low=1), "x=None: must be an integer >= 1"),
])
def test_refused_with_the_accepted_range(value, kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_option({"x": value}, "x", **kwargs)
