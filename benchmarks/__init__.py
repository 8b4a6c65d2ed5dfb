"""Benchmark suite for effc: evaluation assets and benchmark scripts."""
