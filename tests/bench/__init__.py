"""The benchmark harness behind `make bench`: speed, scale and memory, each measured next to its floor.

Run it as `python -m tests.bench [--sizes 1000,10000] [--seed 7] [--out bench-results/] [--quick]`.
Its modules are not named test_*, so pytest does not collect them; tests/test_bench_smoke.py runs it end to end.
"""
