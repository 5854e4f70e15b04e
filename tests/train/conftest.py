"""Fixtures for the training tests; the store builders live in synthetic_store.py."""
import pytest

from tests.train.synthetic_store import Mixture, adience_like, write_store


@pytest.fixture(scope="session")
def gaussian_store(tmp_path_factory):
    """8 age classes, 4000 rows; returns (store, mixture)."""
    mixture = Mixture.make()
    x, y = mixture.sample(4000)
    return write_store(tmp_path_factory.mktemp("store"), x, adience_like(y)), mixture
