"""Fixtures live in tests/helpers.py beside the helpers the tests import."""

from tests.helpers import emulator, make_emulator  # noqa: F401  (pytest finds fixtures by name)
