"""The README stays short and self-contained: under 200 lines, every relative link resolves
inside the repository, and no link leaves it through a local path (such as ../shared)."""

import re

from conftest import ROOT


def test_readme_is_short_and_its_links_stay_in_the_repository():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#]+)", page.read_text()):
            if target.startswith("https://"):
                continue
            resolved = (page.parent / target).resolve()
            assert resolved.is_relative_to(ROOT) and resolved.exists(), (page.name, target)
    assert "../shared" not in readme and "@inproceedings" in readme
