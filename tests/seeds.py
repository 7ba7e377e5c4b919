"""A pytest plugin: random tests draw a fresh seed, and a failing one prints it.

The ``rng`` fixture gives a ``torch.Generator`` seeded from the OS (or from $BLV_TEST_SEED, to
rerun a failure); the seed is attached to the test, and a failure's report gets a section
saying how to reproduce it.
"""

import os

import pytest
import torch

SEED_VARIABLE = "BLV_TEST_SEED"


@pytest.fixture
def rng(request) -> torch.Generator:
    """A generator with a fresh seed per test, or $BLV_TEST_SEED's: a failing test prints its seed."""
    seed = int(os.environ.get(SEED_VARIABLE) or int.from_bytes(os.urandom(4), "little"))
    request.node.user_properties.append(("seed", seed))
    return torch.Generator().manual_seed(seed)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    seeds = [value for name, value in item.user_properties if name == "seed"]
    if report.failed and seeds:
        report.sections.append(
            ("random seed", f"this test drew seed {seeds[0]}: rerun it with {SEED_VARIABLE}={seeds[0]}")
        )
    return report
