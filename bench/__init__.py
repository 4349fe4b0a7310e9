"""nbchat's benchmarks: ``python -m bench`` prints a table and writes JSON lines.

Every figure is a ratio against a baseline measured in the same run, because the
machines this runs on are noisy; goals are checked here, never in the test suite.
"""
