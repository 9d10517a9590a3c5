"""Benchmarks: merge quality against the baselines, speed and memory against the forward floor."""
