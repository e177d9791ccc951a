"""docs/methods.md's generated reference matches the code."""

from __future__ import annotations

import tomllib
from pathlib import Path

from peft_methods import method_docs

ROOT = Path(__file__).resolve().parents[2]


def test_methods_page_is_current():
    page = method_docs.DOCS_PAGE.read_text(encoding="utf-8")
    assert method_docs.generated_part(page) == method_docs.render(), (
        "docs/methods.md is stale: run `python -m peft_methods.method_docs` and commit the result"
    )


def test_reference_covers_exactly_the_builtin_methods():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    ours = {name for name, target in pyproject["project"]["entry-points"]["peftfleet.peft_methods"].items()
            if target.startswith("peft_methods.")}
    assert set(method_docs.builtin_methods()) == ours  # a third-party plugin (IA³) is left out even when installed
    reference = method_docs.render()
    for name in ours:
        assert f"### `{name}` config" in reference


def test_check_reports_a_stale_page_and_a_rewrite_fixes_it(tmp_path):
    page = tmp_path / "methods.md"
    current = f"# Methods\n\n{method_docs.BEGIN}\n\n{method_docs.render()}\n\n{method_docs.END}\n\nMore prose.\n"
    page.write_text(current.replace("| Rank of the update", "| Rank of the updates"), encoding="utf-8")
    assert method_docs.main(["--check", "--page", str(page)]) == 1
    assert method_docs.main(["--page", str(page)]) == 0
    assert page.read_text(encoding="utf-8") == current
    assert method_docs.main(["--check", "--page", str(page)]) == 0


def test_missing_markers_are_an_error(tmp_path):
    page = tmp_path / "methods.md"
    page.write_text("# no markers here\n", encoding="utf-8")
    assert method_docs.main(["--check", "--page", str(page)]) == 2
