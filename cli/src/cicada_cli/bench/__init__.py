"""Benchmarks: cold-start ablation, mixed-priority load."""
