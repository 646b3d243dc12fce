"""References in the code and the docs resolve inside the repository: every cited specification
is a file under docs/spec/ and is cited by that path, and nothing points at notes or trackers
that a clone does not have."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "docs" / "spec"
SEARCHED = ["rayunlearn", "docs", "tests", "cluster", "README.md", "Makefile"]
SUFFIXES = {".py", ".md", ".yaml", ".yml", ".txt", ".sh", ".toml", ""}
# the specifications are kept verbatim (they cite each other as siblings)
VERBATIM = SPEC_DIR
OUTSIDE = [r"\.\./shared", r"\bDESIGN\.md\b", r"\bPAPER_NOTES\b", r"\bissues? #?\d+"]


def _lines(skip_verbatim: bool = False):
    """(file relative to the root, line number, text) for every line of every searched file."""
    for entry in SEARCHED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix not in SUFFIXES or "__pycache__" in f.parts or f == Path(__file__).resolve():
                continue
            if skip_verbatim and VERBATIM in f.parents:
                continue
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                yield f.relative_to(ROOT), n, line


def test_every_cited_spec_exists():
    cited = {}
    for f, n, line in _lines():
        for m in re.finditer(r"docs/spec/([\w.-]*\w)", line):
            cited.setdefault(m.group(1), []).append(f"{f}:{n}")
    missing = {name: where for name, where in cited.items() if not (SPEC_DIR / name).is_file()}
    assert missing == {}
    # every specification is cited somewhere (so the check above had something to check)
    assert sorted(cited) == sorted(p.name for p in SPEC_DIR.glob("*.md"))


def test_specs_are_cited_by_their_path_in_the_repository():
    names = "|".join(re.escape(p.name) for p in SPEC_DIR.glob("*.md"))
    bare = [f"{f}:{n}: {line.strip()}" for f, n, line in _lines(skip_verbatim=True)
            for m in re.finditer(rf"(?<![\w.-])((?:[\w./-]*/)?(?:{names}))", line)
            if m.group(1) != "docs/spec/" + m.group(1).rpartition("/")[2]]
    assert not bare, "cite specifications as docs/spec/NAME:\n" + "\n".join(bare)


def test_no_reference_to_notes_or_trackers_outside_the_repository():
    found = [f"{f}:{n}: {line.strip()}" for f, n, line in _lines(skip_verbatim=True)
             if any(re.search(p, line, flags=re.IGNORECASE) for p in OUTSIDE)]
    assert not found, "references outside the repository:\n" + "\n".join(found)
