"""Benchmarks: what llama-runner costs against direct llama-server (run: python -m tools.bench)."""
