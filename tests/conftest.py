"Shared pytest settings: tests marked `slow` run only with --full-size (`make test-full-size`)."
import pytest


def pytest_addoption(parser):
    parser.addoption("--full-size", action="store_true", help="also run the tests marked slow (full model size, tens of minutes)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: full model size on the CPU, tens of minutes; run with --full-size (make test-full-size)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full-size"): return
    skip = pytest.mark.skip(reason="full-size test: run with --full-size (make test-full-size)")
    for item in items:
        if "slow" in item.keywords: item.add_marker(skip)
