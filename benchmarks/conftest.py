"""Benchmarks: real measurements, run by `nox -s bench` with pytest-benchmark enabled (not part of `nox -s tests`)."""
