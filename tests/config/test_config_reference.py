"""The config reference: docs/training.md's generated section matches the dataclasses, the generator's
``--check`` catches a stale copy, and ``--help`` of the entry points prints every key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from mgrpo_fast.config import describe
from mgrpo_fast.config.fields import field_doc
from mgrpo_fast.config.run import TrainConfig

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "training.md"


def all_keys() -> list[tuple[str, dataclasses.Field]]:
    out = []
    for f in dataclasses.fields(TrainConfig):
        section = f.default_factory if f.default is dataclasses.MISSING else None
        if dataclasses.is_dataclass(section):
            out += [(f"{f.name}.{g.name}", g) for g in dataclasses.fields(section)]
        else:
            out.append((f.name, f))
    return out


def test_docs_training_reference_is_up_to_date():
    text = DOC.read_text(encoding="utf-8")
    assert describe.render_into(text) == text, (
        "docs/training.md's config reference is out of date: run "
        "python -m mgrpo_fast.config.describe docs/training.md"
    )


def test_reference_has_one_row_per_key_with_its_doc():
    md = describe.markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    assert len(rows) == len(all_keys())
    for key, f in all_keys():
        (row,) = [r for r in rows if r.startswith(f"| `{key}` |")]
        assert row.endswith(f"| {field_doc(f).replace('|', chr(92) + '|')} |"), row
    assert "| `optim.betas` | `[float, float]` | `[0.9, 0.999]` | `>= 0, < 1` | AdamW's" in md
    loss_types = "`grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo`"
    assert f"| `loss.loss_type` | `str` | `dapo` | {loss_types} |" in md
    assert "| `model.path` | `str \\| null` | `null` |  |" in md  # pipes escaped inside table cells


def test_check_mode_catches_a_stale_reference(tmp_path, capsys):
    stale = tmp_path / "training.md"
    text = DOC.read_text(encoding="utf-8")
    stale.write_text(text.replace("AdamW peak learning rate.", "an outdated line"), encoding="utf-8")
    assert describe.main(["--check", str(stale)]) == 1
    assert "out of date" in capsys.readouterr().err
    assert describe.main([str(stale)]) == 0  # rewrites it
    assert stale.read_text(encoding="utf-8") == text
    assert describe.main(["--check", str(stale)]) == 0


def test_render_needs_the_markers():
    with pytest.raises(ValueError, match="expected one line"):
        describe.render_into("# no markers here\n")
    with pytest.raises(ValueError, match="expected one line"):
        describe.render_into(f"{describe.END}\n{describe.BEGIN}\n")


@pytest.mark.parametrize("module", ["mgrpo_fast.train", "mgrpo_fast.config"])
def test_entry_point_help_prints_every_key(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == describe.help_text()
    for key, _ in all_keys():
        assert f"\n  {key}: " in out.stdout, key
    assert "  train.total_steps: int = 200  [>= 1]\n      Training steps;" in out.stdout
