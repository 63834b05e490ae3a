"""The README and docs/ are part of the product: their Python examples run as written, their links,
file paths and ``python -m`` commands exist, the README stays a short door (<= 200 lines), and nothing
refers to documents outside the repository."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
REQUIRED_DOCS = {"algorithm", "training", "kernels", "distributed", "troubleshooting"}
# Backquoted paths of the repository (``mgrpo_fast/rl/trainer.py``, ``tests/x.py::test_y``, ``configs/``).
REPO_PATH = re.compile(r"`((?:mgrpo_fast|kernels|csrc|tests|benchmarks|configs|docs)/[^`\s]*)`")
PYTHON_M = re.compile(r"python -m ([\w.]+)")


def ids(page: pathlib.Path) -> str:
    return str(page.relative_to(ROOT))


def python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: pathlib.Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#+ (.+)$", page.read_text(encoding="utf-8"), re.M)}


def test_readme_is_a_short_door():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "README.md is the door, not the manual: move detail into docs/"
    assert "make test" in text and "make demo" in text
    assert "torchrun --nproc_per_node" in text
    assert {p.stem for p in DOCS} >= REQUIRED_DOCS
    for stem in REQUIRED_DOCS:
        assert f"(docs/{stem}.md)" in text, f"README.md does not link docs/{stem}.md"


def test_readme_drop_in_example_runs_and_trains():
    (block,) = [b for b in python_blocks(README) if "fused_linear_grpo_loss" in b]
    namespace: dict = {}
    exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["loss"].isfinite()
    for name in ("hidden", "weight"):
        grad = namespace[name].grad
        assert grad is not None and grad.isfinite().all() and grad.abs().sum() > 0, name


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=ids)
def test_python_examples_run(page):
    for block in python_blocks(page):
        namespace: dict = {}
        torch.manual_seed(0)
        exec(compile(block, str(page), "exec"), namespace)  # noqa: S102 - our own docs
        # the examples check themselves (asserts); their results must at least be finite
        for name in ("loss", "logp"):
            if isinstance(namespace.get(name), torch.Tensor):
                assert namespace[name].isfinite().all(), f"{page.name}: {name}"


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_links_and_anchors_resolve(page):
    text = page.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, fragment = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: link to {target} that does not exist"
        if fragment:
            assert dest.suffix == ".md" and fragment in anchors(dest), f"{page.name}: no anchor {target}"


@pytest.mark.parametrize("page", PAGES, ids=ids)
def test_paths_and_commands_exist(page):
    text = page.read_text(encoding="utf-8")
    for path in REPO_PATH.findall(text):
        path = path.split("::")[0].rstrip(".,:;")
        if any(c in path for c in "<*{"):  # a pattern of files a command writes, not a repository path
            continue
        assert (ROOT / path).exists(), f"{page.name}: `{path}` does not exist"
    for module in PYTHON_M.findall(text):
        if module.startswith("mgrpo_fast"):
            assert importlib.util.find_spec(module) is not None, f"{page.name}: python -m {module}"
    for target in re.findall(r"`make ([\w-]+)", text):
        makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{page.name}: make {target}"


def test_nothing_refers_to_documents_outside_the_repository():
    design = "DESIGN" + ".md"
    files = [p for p in ROOT.iterdir() if p.is_file()]
    for folder in ("docs", "mgrpo_fast", "kernels", "csrc", "tests", "benchmarks", "configs", ".ci"):
        files += [p for p in (ROOT / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    offenders = []
    for path in files:
        if path.suffix not in {"", ".py", ".md", ".yaml", ".toml", ".cfg", ".txt", ".cpp", ".h"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if design in text or "DESIGN" + " §" in text:
            offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"these files refer to a design document outside the repository: {offenders}"
