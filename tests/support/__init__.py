"""Helpers shared by the tests (fixtures, generated models)."""
