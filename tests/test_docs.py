"""The documentation: the README, the mkdocs-material site under docs/ and its configuration reference.

The site builds with `mkdocs build --strict` (a link to a missing page or heading fails it), the reference
(docs/reference.md) is what finetune/config/reference.py generates from the schema and conf/ and describes
every key, and the examples the docs repeat from the README are the README's, which other tests run.
Every command line of the README and of the docs is checked in test_readme_commands.py."""

import os
import re
import subprocess
import sys
import textwrap
import typing

import pytest
from tiny_runs import ROOT

from finetune.config import reference, schema

README = (ROOT / "README.md").read_text()
DOCS = ROOT / "docs"
REGENERATE = "python -m finetune.config.reference -o docs/reference.md"


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("material", reason='the docs extra: pip install -e ".[docs]"')
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(site)], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ["index.html", "reference/index.html", "guide/layer-groups/index.html", "benchmarks/recipes/index.html",
                 "regimes/summary.png"]:
        assert (site / page).is_file(), page


def test_the_reference_is_up_to_date():
    committed = (DOCS / "reference.md").read_text()
    assert committed == reference.markdown(), f"docs/reference.md is out of date: run `{REGENERATE}`"


def test_every_schema_key_has_a_description():
    missing = reference.undocumented()
    assert not missing, f"schema keys without a description (a comment beside the field in schema.py): {missing}"


def _leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    for name in cls.__dataclass_fields__:
        if hasattr(hints[name], "__dataclass_fields__"):
            yield from _leaf_keys(hints[name], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}"


def test_the_reference_lists_every_key_with_its_recipes():
    text = (DOCS / "reference.md").read_text()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `([\w.]+)` \|.*$", text, re.M)}
    for key in _leaf_keys(schema.TrainConfig):
        assert key in rows, key
    # the type, the default, and what each recipe sets: lp_ft's body ratio, freezeout's schedule end
    assert rows["lr_spread.ratio"].startswith("| `lr_spread.ratio` | float | `0.1` |")
    assert "lp_ft: `0.02`" in rows["lr_spread.ratio"]
    assert "freezeout: `true`" in rows["schedule.end_at_freeze"]
    assert "auto: `true`" in rows["auto.enabled"]
    assert rows["model.name"].split(" | ")[2] == "`tf_efficientnet_lite0`"  # conf/train.yaml's default group
    assert "sgd / adamw / adam / rmsprop" in rows["optimizer.name"]  # an enum: its choices
    for recipe in reference.recipes():  # the recipes table names every file of conf/experiment/
        assert f"| `{recipe}` |" in text


def test_a_key_without_a_comment_is_found(tmp_path, monkeypatch):
    (tmp_path / "doc_probe_schema.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass

        @dataclass
        class Probe:
            beside: int = 1  # said beside it
            # said above it,
            # on two lines
            above: float = 0.5

            bare: bool = False
            trailing_wins: str = "x"  # this one
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    import doc_probe_schema

    found = reference.descriptions(doc_probe_schema.Probe)
    assert found == {"beside": "said beside it", "above": "said above it, on two lines", "bare": "",
                     "trailing_wins": "this one"}


def _block(text: str, opening: str) -> str:
    match = re.search(re.escape(opening) + r".*?```", text, re.S)
    assert match, opening
    return match.group(0)


def test_the_docs_repeat_the_readmes_tested_examples():
    """The README's Python block (test_api runs it) and my_model.py (test_targets runs it) appear in the
    docs as they are in the README."""
    api = _block(README, "```python\nimport finetune\n")
    assert README.split("```python\n", 1)[1].startswith("import finetune\n")  # the first python block: test_api's
    assert api in (DOCS / "getting-started.md").read_text()
    own = _block(README, "```python\n# my_model.py\n")
    assert own in (DOCS / "guide" / "your-model-and-data.md").read_text()


def test_the_readme_is_short_and_its_links_resolve():
    assert len(README.splitlines()) <= 300
    targets = re.findall(r"\]\(([^)\s]+)\)", README)
    assert targets
    for target in targets:
        if re.match(r"[a-z]+://|#", target):
            continue
        assert (ROOT / target.split("#")[0]).exists(), target


def test_the_package_metadata_offers_the_docs_extra():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^docs = \["mkdocs-material>=9"\]$', pyproject, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert '.[test,sweep,export,tensorboard,docs,hf,peft,data,trackers]' in makefile and re.search(r"^docs:", makefile, re.M)


def test_the_development_layout_names_every_module_and_config_group():
    """docs/development.md's map of the package: a module or config group added without a word there fails."""
    text = (ROOT / "docs" / "development.md").read_text()
    layout = text.split("## Layout", 1)[1].split("## ", 1)[0]
    package = ROOT / "finetune"
    missing = [f"{p.parent.name}/{p.name}" for p in sorted(package.glob("*/*.py"))
               if p.name != "__init__.py" and p.name not in layout]
    missing += [f"conf/{d.name}/" for d in sorted((ROOT / "conf").iterdir()) if d.is_dir() and f"{d.name}/" not in layout]
    assert not missing, f"docs/development.md's layout does not name {missing}"
