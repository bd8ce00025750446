"""Test helpers for persister authors: ``conformance.PersisterConformance`` holds every lock rule."""

__all__: list[str] = []
