"""docs/defaults.md lists each optimizer's defaults next to its paper's: its "distopt" column must
be what the constructors really use."""

import ast
import inspect
import re
from pathlib import Path

import pytest

from distopt.optim import REGISTRY

DOC = Path(__file__).resolve().parents[2] / "docs" / "defaults.md"
ROW = re.compile(r"^\| (?P<algo>[\w-]+) \| `(?P<key>\w+)` \| `(?P<value>[^`]+)` \|")


def _rows():
    return [m.groupdict() for line in DOC.read_text().splitlines() if (m := ROW.match(line))]


def test_the_table_covers_every_algorithm():
    algorithms = {row["algo"] for row in _rows()}
    assert algorithms == set(REGISTRY) - {"adamw"}


@pytest.mark.parametrize("row", _rows(), ids=lambda r: f"{r['algo']}.{r['key']}")
def test_documented_default_is_the_constructors(row):
    parameters = inspect.signature(REGISTRY[row["algo"]].__init__).parameters
    assert row["key"] in parameters, f"{row['algo']} has no parameter {row['key']}"
    assert parameters[row["key"]].default == ast.literal_eval(row["value"])
