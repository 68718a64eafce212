"""The documentation holds together: every relative link in the README, docs/ and studies/
points at a file that exists (and, with #anchor, at a heading in it), the README stays a
front page, and what it says about the command line is what the command line does."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from run_pipeline import build_parser

PAGES = sorted([ROOT / "README.md", ROOT / "CHANGELOG.md", *(ROOT / "docs").rglob("*.md"),
                *(ROOT / "studies").rglob("*.md")])
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # code is not a link
    text = re.sub(r"`[^`\n]*`", "", text)
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t)]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not broken, broken


def test_the_link_checker_finds_a_broken_link(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("# Title\n[a](missing.md) [b](p.md#title) [c](p.md#nope) `[d](x.md)`\n"
                    "```\n[e](in-code.md)\n```\n")
    assert links(page) == ["missing.md", "p.md#title", "p.md#nope"]
    assert anchors(page) == {"title"} and slug("The paper's three claims") == \
        "the-papers-three-claims"


def test_the_readme_is_a_front_page_whose_quickstart_ci_runs():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
    # .ci/run runs exactly what this prints, in a fresh virtual environment
    printed = subprocess.run([sys.executable, str(ROOT / ".ci" / "quickstart.py"),
                              str(ROOT / "README.md")], capture_output=True, text=True,
                             check=True).stdout.splitlines()
    assert printed == ['pip install -e . && python run_pipeline.py',
                       'pip install -e ".[test]" && python -m pytest']


def test_every_subcommand_the_readme_names_exists():
    names = set(build_parser()._subparsers._group_actions[0].choices)
    used = set(re.findall(r"^attmask ([a-z-]+)", (ROOT / "README.md").read_text(), flags=re.M))
    assert used and used <= names, used - names


def test_the_documentation_site_builds_with_no_broken_link(tmp_path):
    """MkDocs in strict mode over the staged pages (``python .ci/docs_site.py``): a link or an
    #anchor that MkDocs cannot resolve fails the build, and a planted one is caught."""
    pytest.importorskip("mkdocs")
    sys.path.insert(0, str(ROOT / ".ci"))
    from docs_site import build  # .ci/docs_site.py

    build(tmp_path / "site")
    assert (tmp_path / "site" / "index.html").is_file()
    assert (tmp_path / "site" / "docs" / "usage" / "index.html").is_file()

    from mkdocs.exceptions import Abort

    broken = tmp_path / "broken"
    for name in ("README.md", "CHANGELOG.md", "LICENSE"):
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_text((ROOT / name).read_text())
    (broken / "README.md").write_text("# attmask\n\n[gone](docs/gone.md)\n")
    with pytest.raises(Abort):
        build(tmp_path / "broken-site", root=broken)
