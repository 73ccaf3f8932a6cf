"""The behaviours every optimizer shares, run over the optimizer table (``optimizer_table.py``)."""

import pytest
from helpers import assert_resume_bit_identical
from optim_checks import assert_matrix_group_trains, assert_refused, assert_state_bytes_match, one_thread  # noqa: F401
from optimizer_table import OPTIMIZERS

import distopt

pytestmark = pytest.mark.usefixtures("one_thread")


def _cases(attr: str):
    return [pytest.param(info, case, id=f"{info.name}-{i}") for info in OPTIMIZERS for i, case in enumerate(getattr(info, attr))]


@pytest.mark.parametrize("info,hparams", _cases("trains"))
def test_matrix_group_alone_lowers_the_loss(info, hparams):
    assert_matrix_group_trains(info.name, **hparams)


@pytest.mark.parametrize("info,hparams", _cases("state_bytes"))
def test_state_bytes_match_the_formula(info, hparams):
    model = info.bytes_model()
    opt = distopt.build_optimizer(model, info.name, **hparams)
    assert_state_bytes_match(opt, model, info.bytes_formula, steps=info.bytes_steps)


@pytest.mark.parametrize("info,hparams", _cases("resume"))
def test_resume_is_bit_identical(info, hparams):
    assert_resume_bit_identical(info.name, **hparams)


@pytest.mark.parametrize("info,case", _cases("bad_inputs"))
def test_bad_hyperparameters_are_refused(info, case):
    kwargs, match = case
    assert_refused(info.name, kwargs, match)


@pytest.mark.parametrize("info,check", _cases("defining"))
def test_defining_property(info, check):
    check()


def test_every_registered_optimizer_is_in_the_table():
    assert {info.name for info in OPTIMIZERS} == set(distopt.list_optimizers()) - {"adamw"}
