"""Command-line entry points: train, demo, compare, loss-demo, eval."""
