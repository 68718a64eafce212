"""Build the documentation site (MkDocs, strict: a broken link or #anchor fails the build).

The pages live where a reader of the repository finds them (README.md, CHANGELOG.md, docs/,
studies/), and MkDocs wants one folder that is not the config's parent, so they are staged
with the files they link to (configs/, LICENSE) into a temporary folder first. README.md files
become their folder's index page.

    python .ci/docs_site.py [OUT_DIR]        (default: build/site)
"""
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = ["README.md", "CHANGELOG.md", "LICENSE", "docs", "studies", "configs"]
CONFIG = """site_name: attmask
docs_dir: {src}
site_dir: {out}
strict: true
validation:
  links: {{not_found: warn, anchors: warn, absolute_links: warn, unrecognized_links: warn}}
"""


def build(out: Path, root: Path = ROOT) -> None:
    """Stage ``root``'s pages and build the site into ``out``; raises on any broken link."""
    from mkdocs.commands.build import build as mkdocs_build
    from mkdocs.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in PAGES:
            path = root / name
            if path.is_dir():
                shutil.copytree(path, src / name)
            elif path.is_file():
                shutil.copy2(path, src / name)
        config_file = Path(tmp) / "mkdocs.yml"
        config_file.write_text(CONFIG.format(src=src, out=Path(out).resolve()))
        mkdocs_build(load_config(str(config_file)))


if __name__ == "__main__":
    build(Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "build" / "site"))
