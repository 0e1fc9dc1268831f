"""The repository stands on its own: no tracked file cites a document that lives outside it.

Facts the project relies on are written into docs/ with their public source; a reference to a
private notes file or a sibling folder is a dead link for every user of the repository."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Built from parts so that this file does not match itself.
OUTSIDE = ("FIELD" + "-NOTES", "../" + "shared/", "/work/" + "shared")
OUTSIDE_REFERENCES = re.compile("|".join(re.escape(p) for p in OUTSIDE))


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in out.decode().split("\0") if name]


def outside_references(files: list[Path], root: Path = ROOT) -> list[str]:
    found = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, FileNotFoundError):
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_REFERENCES.search(line):
                found.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    return found


def test_repository_no_tracked_file_cites_a_document_outside_it():
    files = tracked_files()
    assert len(files) > 50, "git ls-files listed almost nothing: not run from the repository?"
    assert outside_references(files) == []


def test_outside_references_reports_each_citation_with_file_and_line(tmp_path):
    sample = tmp_path / "x.py"
    sample.write_text("# see " + "FIELD" + "-NOTES 3\nok\n# ../" + "shared/STY" + "LE.md\n")
    assert [hit.split(": ")[0] for hit in outside_references([sample], root=tmp_path)] == ["x.py:1", "x.py:3"]
