"""Helpers shared by the test suite: test servers and fixtures."""
