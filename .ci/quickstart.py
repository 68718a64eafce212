"""Print the README's Quickstart commands, one per line, as a new user would copy them: the
lines of the first ``bash`` block under "## Quickstart" that are not comments."""
import re
import sys
from pathlib import Path


def quickstart_commands(readme: Path) -> list[str]:
    section = readme.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S)
    if block is None:
        raise SystemExit(f"{readme}: no ```bash block under ## Quickstart")
    return [line for line in block.group(1).splitlines() if line.strip() and
            not line.lstrip().startswith("#")]


if __name__ == "__main__":
    print("\n".join(quickstart_commands(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))))
