#!/usr/bin/env python3
"""Turn unpacked Debian documentation and kernel sources into JSON-lines documents.

Usage: to_jsonl.py OUT_DIR MAX_C_BYTES ROOT...
Every *.html file becomes one document (text only: script, style and navigation dropped,
block elements end lines); every *.c and *.h file below a ROOT is one document, taken in
sorted path order until MAX_C_BYTES of C text. Documents go to OUT_DIR/train.jsonl or
OUT_DIR/test.jsonl: the held-out split is chosen by document (about 2 %, by a hash of its
path), so no document is split between the two.
"""
import hashlib
import html.parser
import json
import os
import sys

SKIP = {"script", "style", "nav", "head"}
BLOCK = {"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "section", "table"}


class Text(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in SKIP:
            self.skip += 1
        elif tag in BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in SKIP and self.skip:
            self.skip -= 1
        elif tag in BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(path):
    p = Text()
    with open(path, encoding="utf-8", errors="replace") as f:
        p.feed(f.read())
    lines = [" ".join(l.split()) for l in "".join(p.parts).splitlines()]
    out, blank = [], False
    for l in lines:
        if l:
            out.append(l)
            blank = False
        elif not blank:
            out.append("")
            blank = True
    return "\n".join(out).strip()


def held_out(rel):
    return hashlib.sha256(rel.encode()).digest()[0] < 6  # 6/256 ~ 2.3 %


def main():
    out_dir, max_c = sys.argv[1], int(sys.argv[2])
    os.makedirs(out_dir, exist_ok=True)
    files = {"train": open(os.path.join(out_dir, "train.jsonl"), "w"), "test": open(os.path.join(out_dir, "test.jsonl"), "w")}
    counts = {"html": 0, "c": 0, "c_bytes": 0, "test": 0}
    for root in sys.argv[3:]:
        paths = []
        for d, _, names in os.walk(root):
            paths += [os.path.join(d, n) for n in names]
        for path in sorted(paths):
            rel = os.path.relpath(path, root)
            if path.endswith(".html"):
                text = html_text(path)
                kind = "html"
            elif path.endswith((".c", ".h")):
                if counts["c_bytes"] >= max_c:
                    continue
                with open(path, encoding="utf-8", errors="replace") as f:
                    text = f.read()
                counts["c_bytes"] += len(text)
                kind = "c"
            else:
                continue
            if len(text) < 200:
                continue
            counts[kind] += 1
            split = "test" if held_out(rel) else "train"
            counts["test"] += split == "test"
            files[split].write(json.dumps({"text": text, "source": rel}) + "\n")
    for f in files.values():
        f.close()
    print(f"{counts['html']} HTML documents, {counts['c']} C files ({counts['c_bytes'] / 1e6:.0f} MB), {counts['test']} held out", file=sys.stderr)


if __name__ == "__main__":
    main()
