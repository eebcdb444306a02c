"""The GPU suite\x27s helpers (benchmarks/gpu_suite.py is the command)."""
