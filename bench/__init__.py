"""Benchmarks: scripts run by `make bench-*`, their JSON results in bench/results/, and the
report generated from those results (docs/benchmarks.md, by bench/report.py). Outside the
installed packages: run from the repository root (`python -m bench.serve`)."""
