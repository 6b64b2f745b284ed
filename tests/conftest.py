import pytest

from helpers import primitives


@pytest.fixture
def prims():
    return primitives()
