"""The configuration reference is generated from the typed config models and the README's copy
is current."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field, SecretStr

from bimors import config_reference as ref
from bimors.config import Config, Section

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config model, found independently of the module under test."""
    keys = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys += _leaf_keys(annotation, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _row(text: str, key: str) -> str:
    rows = [line for line in text.splitlines() if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"expected one row for {key}, found {len(rows)}"
    return rows[0]


def test_readme_reference_is_current():
    text = README.read_text(encoding="utf-8")
    assert ref.START in text and ref.END in text, "README.md lacks the config-reference markers"
    assert ref.extract(text) == ref.render(), (
        "README.md's configuration reference is stale: bimors/config.py changed. Regenerate it with "
        f"`{ref.REGENERATE}` and commit README.md."
    )


def test_reference_sits_before_development_section():
    text = README.read_text(encoding="utf-8")
    assert text.index("## Configuration reference") < text.index(ref.START) < text.index("## Development")


def test_every_field_of_every_section_appears():
    text = ref.render()
    keys = _leaf_keys(Config)
    assert len(keys) > 50
    for key in keys:
        _row(text, key)
    # one table per section that has keys of its own, in the model's order
    for section in ("storage", "data", "data.decode", "model.backbone", "featurize.caption", "tracking"):
        assert f"### `{section}`" in text
    assert text.index("### `data`") < text.index("### `data.decode`") < text.index("### `model.backbone`")


def test_rows_show_type_default_and_description():
    text = ref.render()
    assert _row(text, "optim.lr") == "| `optim.lr` | `float (> 0)` | `0.009` |  |"
    row = _row(text, "model.learner.ctx_init")
    assert "`str \\| null`" in row and '`"a photo of a"`' in row
    assert "token embeddings initialise the context" in row
    assert '"sgd" \\| "adamw"' in _row(text, "optim.name")
    # defaults come from the section as built inside its parent, not from the section's class
    assert "| `32` |" in _row(text, "featurize.decode.batch_size")
    assert "| `256` |" in _row(text, "evaluate.predict.batch_size")
    # secrets: a type, never a value
    assert "| `SecretStr \\| null` | `null` |" in _row(text, "storage.secret")


def test_render_follows_the_models():
    class Inner(Section):
        """An extra section."""

        size: int = Field(3, ge=1, description="how many")

    class Modified(Config):
        extra: Inner = Inner()
        flag: bool = Field(True, description="a new switch")

    original = ref.render()
    changed = ref.render(Modified)
    assert changed != original
    assert "| `flag` | `bool` | `true` | a new switch |" in changed
    assert "### `extra`" in changed and "An extra section." in changed
    assert "| `extra.size` | `int (>= 1)` | `3` | how many |" in changed
    assert "`flag`" not in original

    # a changed default shows up, and the README check then fails
    instance = Config.model_validate({"optim": {"lr": 0.5}})
    assert "| `0.5` |" in _row(ref.render(Config, instance), "optim.lr")
    assert ref.render(Config, instance) != ref.extract(README.read_text(encoding="utf-8"))


def test_secret_defaults_are_never_shown():
    class Secrets(Section):
        token: SecretStr = SecretStr("hunter2-do-not-print")
        maybe: SecretStr | None = None

    text = ref.render(Secrets)
    assert "hunter2" not in text
    assert "(secret, not shown)" in _row(text, "token")
    assert "| `null` |" in _row(text, "maybe")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bimors.config_reference", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )


def test_cli_write_and_check(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text(f"# Title\n\nintro\n\n{ref.START}\nold table\n{ref.END}\n\n## After\n", encoding="utf-8")

    stale = _cli("--check", str(doc))
    assert stale.returncode == 1
    assert "stale" in stale.stderr and f"python -m bimors.config_reference --write {doc}" in stale.stderr

    wrote = _cli("--write", str(doc))
    assert wrote.returncode == 0, wrote.stderr
    text = doc.read_text(encoding="utf-8")
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{ref.END}\n\n## After\n")
    assert "old table" not in text and ref.extract(text) == ref.render()
    assert _cli("--check", str(doc)).returncode == 0

    # writing again changes nothing
    assert _cli("--write", str(doc)).returncode == 0
    assert doc.read_text(encoding="utf-8") == text


def test_cli_without_markers_fails_clearly(tmp_path):
    doc = tmp_path / "DOC.md"
    doc.write_text("no markers here\n", encoding="utf-8")
    result = _cli("--check", str(doc))
    assert result.returncode == 2
    assert "config-reference:start" in result.stderr


@pytest.mark.parametrize("args", [(), ("--help",)])
def test_cli_prints(args):
    result = _cli(*args)
    assert result.returncode == 0
    assert ("| `seed` |" in result.stdout) if not args else ("--write" in result.stdout)


def test_a_sections_field_description_is_shown():
    class Pool(Section):
        """A pool."""

        size: int = 1

    class Outer(Section):
        pool: Pool = Field(Pool(), description="the nightly pool")

    text = ref.render(Outer)
    assert text.index("the nightly pool") < text.index("A pool.") < text.index("| `pool.size` |")
