"""Fault-injection regression suites (issue 13)."""
