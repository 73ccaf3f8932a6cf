"""The ZeRO adapter names its supported DeepSpeed range: older releases are refused with the fix,
newer ones are tried with a warning."""

from __future__ import annotations

import logging

import pytest

from distopt.engines import deepspeed as adapter


@pytest.mark.parametrize("version", ["0.16.9", "0.19.5", "0.18.9", "0.14.0+cu121", "0.9.5"])
def test_older_releases_are_refused_with_the_range_and_the_fix(version):
    with pytest.raises(RuntimeError) as err:
        adapter.check_deepspeed_version(version)
    assert version in str(err.value) and adapter.DEEPSPEED_RANGE in str(err.value) and "pip install" in str(err.value)


@pytest.mark.parametrize("version", ["0.19.6", "0.19.7", "0.19.8", "0.19.8+abc123"])
def test_supported_releases_pass_quietly(version, caplog, monkeypatch):
    monkeypatch.setattr(adapter.check_deepspeed_version, "warned", False)
    with caplog.at_level(logging.WARNING, logger="distopt"):
        adapter.check_deepspeed_version(version)
    assert not caplog.records


def test_a_newer_release_warns_once(caplog, monkeypatch):
    monkeypatch.setattr(adapter.check_deepspeed_version, "warned", False)
    with caplog.at_level(logging.WARNING, logger="distopt"):
        adapter.check_deepspeed_version("0.20.1")
        adapter.check_deepspeed_version("0.21.0")
    assert len(caplog.records) == 1 and "0.20.1" in caplog.records[0].getMessage()
