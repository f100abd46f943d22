"""One-off measurements behind figures in docs/ (each module says which, and how to run it:
``python -m benchmarks.probes.NAME`` from the checkout root)."""
