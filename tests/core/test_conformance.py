"""Every lock rule on every persister, against real servers."""

from singleton_integrations.testing.conformance import PersisterConformance


class TestConformance(PersisterConformance):
    """``store_url`` comes from tests/conftest.py, parametrized over the five persisters."""
