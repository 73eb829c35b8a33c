"""Fixtures of the data tests; helpers live in datahelpers.py (a unique name: other packages' tests
have their own conftest modules)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # datahelpers, in any pytest import mode

from datahelpers import write_unique_token_shards  # noqa: E402

from data import DataConfig  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds (still runs in CI)")


@pytest.fixture
def unique_cfg(tmp_path):
    urls, ids = write_unique_token_shards(tmp_path / "shards")
    cfg = DataConfig(urls=urls, tokenizer="pretokenized", cache_dir=str(tmp_path / "cache"), shuffle_buffer=4)
    return cfg, ids
