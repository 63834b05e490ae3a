"""The README's API example is part of the product: it must run as written."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_has_the_two_commands():
    text = README.read_text()
    assert "make test" in text and "make demo" in text


def test_readme_api_example_runs():
    blocks = python_blocks()
    assert blocks, "README.md lost its runnable API example"
    for block in blocks:
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
        # the loss example asserts packed == padded itself; the packed-model one prints log-probs
        if "loss" in namespace:
            assert namespace["loss"].isfinite()
        if "logp" in namespace:
            assert namespace["logp"].isfinite().all()
