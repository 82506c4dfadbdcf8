"""Support for the project's tests and benchmarks; the VMM itself imports nothing from here.

It lives in the package (not in tests/ or bench/) so that both can import it as they import
vmferry: pytest runs with tests/ on its path, a benchmark with bench/ on its own.
"""
