"""Small, deterministically trained evaluation models (digits CNN/ViT, stdlib-docstring causal LMs) for effc benchmarks."""
