"""Benchmarks of libipc's daemons against their peers (`python -m bench.run`)."""
