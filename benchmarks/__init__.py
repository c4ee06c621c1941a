"""Benchmarks: one script per op or pipeline, each comparing providers in one run (see STYLE.md)."""
