"""Command-line tools: ``python -m mgrpo_fast.tools.make_tiny_model`` builds the bundled tiny model."""
