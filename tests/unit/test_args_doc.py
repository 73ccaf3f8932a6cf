"""Every optimizer's docstring ends with an Args section, one line per option with its real default,
built from shared fragments: an option without a fragment fails here, and so does a stale fragment."""

import inspect

import pytest

from distopt.optim import REGISTRY
from distopt.optim.args_doc import FRAGMENTS, OVERRIDES, args_section


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_every_option_is_documented_with_its_default(name):
    cls = REGISTRY[name]
    doc = inspect.getdoc(cls)
    assert doc.count("Args:") == 1
    args = doc[doc.index("Args:"):]
    for key, parameter in inspect.signature(cls.__init__).parameters.items():
        if key == "self":
            continue
        line = next((x for x in args.splitlines() if x.strip().startswith(f"{key} ") or x.strip().startswith(f"{key}:")), None)
        assert line is not None, f"{name}: {key} is not in Args"
        if parameter.default is not inspect.Parameter.empty:
            assert f"(default ``{parameter.default!r}``)" in line, line


def test_no_fragment_is_stale():
    used = {k for cls in REGISTRY.values() for k in inspect.signature(cls.__init__).parameters}
    assert set(FRAGMENTS) <= used, sorted(set(FRAGMENTS) - used)
    algorithms = {cls.algorithm for cls in REGISTRY.values()}
    assert {a for a, _ in OVERRIDES} <= algorithms


def test_an_option_without_a_fragment_is_an_error():
    class Probe:
        algorithm = "probe"

        def __init__(self, params, *, lr=1.0, mystery=2):
            pass

    with pytest.raises(KeyError, match="'mystery' has no fragment"):
        args_section(Probe)
