"""Parallelism beyond data parallel: Ulysses sequence parallelism with ALST tiling (sequence.py)."""
