"""Regenerate mixtral_export/data/tiny_corpus.txt (run once; the output is committed).

Text: the Zen of Python, docstrings of a fixed list of standard-library modules (PSF licence)
and a few hundred lines written here with punctuation, digits, code and non-ASCII text.
Docstrings differ between Python versions, so the committed file, not this script, is the
source of truth.
"""
from __future__ import annotations

import codecs
import contextlib
import importlib
import inspect
import io
import sys
from pathlib import Path

MODULES = [
    "string", "textwrap", "json", "re", "collections", "itertools", "functools", "os.path",
    "pathlib", "math", "random", "datetime", "calendar", "heapq", "fractions", "decimal",
    "shutil", "tempfile", "csv", "enum", "dataclasses", "contextlib", "operator", "copy",
    "argparse", "logging", "abc", "io", "struct", "base64", "hashlib", "zipfile", "gzip",
    "threading", "queue", "sched", "urllib.parse", "glob", "fnmatch", "secrets", "timeit",
    "warnings", "weakref", "tokenize", "locale", "configparser", "subprocess", "array",
    "numbers", "graphlib", "ipaddress", "mimetypes", "colorsys",
]
MAX_CHARS_PER_MODULE = 5000

LINES = """\
Hello, world! How are you today?
The quick brown fox jumps over the lazy dog.
Pack my box with five dozen liquor jugs.
She said: "It's 3:45 p.m. already?!" and left.
Prices rose 12.5% in 2023; they fell 3% in 2024.
Call +1 (555) 010-2030 or e-mail info@example.org.
The meeting is on 2024-03-17 at 09:30 UTC.
Version 1.2.3-rc4 was released on 17/03/2024.
Total: $1,234.56 (tax included) [approx.]
Items: apples, pears & plums; 7 of each.
Temperatures: -5°C at night, 21°C by noon.
A café in Zürich serves crème brûlée and Käsekuchen.
El niño comió piña en la mañana; ¿verdad? ¡Sí!
Ça va très bien, merci. À bientôt, Françoise.
São Paulo, Kraków, Malmö, Reykjavík, Ærøskøbing.
Größe, Straße, Übung, Öffnung, Ärger.
Greek: αβγδε, Ελληνικά, λόγος, φιλοσοφία.
The symbol π ≈ 3.14159 and e ≈ 2.71828.
Σ x_i for i in 1..n, with Δt → 0.
Japanese: こんにちは世界。日本語のテキストです。
Chinese: 你好，世界！这是一个测试。
Korean: 안녕하세요, 세계!
Emoji: 🙂 👍 🚀 🎉 ❤️ 🐍
Arrows → ← ↑ ↓ and bullets • ◦ ‣.
Quotes: “double”, ‘single’, «guillemets», „German“.
Dashes: en – dash, em — dash, and ellipsis…
def add(a: int, b: int) -> int:
    return a + b
for i in range(10):
    print(i * i, end=" ")
if x >= 0 and y != 3:
    z = {"key": [1, 2, 3], 'other': (4, 5)}
class Point:
    def __init__(self, x=0.0, y=0.0):
        self.x, self.y = x, y
import numpy as np; a = np.zeros((2, 3), dtype=np.int64)
while n > 1: n = n // 2 if n % 2 == 0 else 3 * n + 1
lambda s: s.strip().lower().split(",")
x = [i ** 2 for i in range(100) if i % 7 == 3]
# TODO(alice): handle the empty-list case properly.
@dataclass(frozen=True)
with open("data.txt", encoding="utf-8") as f:
    lines = [line.rstrip("\\n") for line in f]
try:
    value = int(text)
except ValueError as exc:
    raise SystemExit(f"bad number: {text!r}") from exc
<html><body><p class="note">Hi &amp; bye</p></body></html>
SELECT name, COUNT(*) FROM users WHERE age > 18 GROUP BY name;
{"id": 42, "tags": ["a", "b"], "ok": true, "ratio": 0.75}
git commit -m "Fix off-by-one in tokenizer" && git push origin main
$ python3 -m pytest -q tests/ --maxfail=1
C:\\Users\\bob\\Documents\\report_v2.docx
https://example.com/path/to/page?query=1&lang=en#section-2
	Tabs	separate	these	columns
Two  spaces,   three   spaces,    four.
   Leading spaces and trailing spaces   
Line one
Line two

Paragraph after a blank line.
Mr. Smith's dog isn't here; it's at Dr. O'Brien's.
Q: What is 7 × 8? A: 56. Q: And 144 ÷ 12? A: 12.
Use `pip install -e .[test]` then run `pytest -q`.
Error: file "config.json" not found (errno 2).
Warning! Disk usage at 97% -- please free space.
a, b, c = 1, 2, 3  # tuple unpacking
print(f"{name:>10} | {score:6.2f} | {rank:03d}")
assert result == expected, f"{result} != {expected}"
    nested = {"a": {"b": {"c": [None, True, False]}}}
return sorted(items, key=lambda kv: (-kv[1], kv[0]))
x &= 0xFF; y |= 0b1010; z ^= 0o17; w <<= 2
matrix[i][j] += alpha * (target - output) ** 2
The ratio 3/4 equals 0.75, and 1e-6 is a millionth.
Coordinates: 48.8566° N, 2.3522° E (Paris).
He paid €45.00, £30.50 and ¥1200 on the trip.
Naïve coöperation at the résumé café façade.
Dvořák, Chopin, Sibelius, Grieg and Bartók.
Μῆνιν ἄειδε θεὰ Πηληϊάδεω Ἀχιλῆος.
Καλημέρα! Τι κάνεις; Ευχαριστώ πολύ.
東京は日本の首都です。今日は晴れです。
北京、上海、广州和深圳都是大城市。
Русский текст: привет, мир!
Weather today: ☀️ then 🌧️, maybe ⛈️ later.
Reactions: 😀 😂 😍 🤔 👀 🔥 ✅ ❌
Math: ∀x ∈ ℝ, x² ≥ 0; ∑ₖ 1/k² = π²/6.
Box drawing: ┌─┬─┐ │ │ │ └─┴─┘
TODO: 1) parse args 2) load data 3) train 4) save.
Step 1 of 3 ... done. Step 2 of 3 ... done. Step 3 of 3 ... failed!
name	age	city
Alice	30	Berlin
Bob	25	Lisbon
Chloé	41	Montréal
		double tab indent
  two-space indent
    four-space indent
        eight-space indent
End of the hand-written section.
"""

SUBJECTS = ["The model", "A small cat", "Our team", "The compiler", "This function", "Every user"]
VERBS = ["reads", "writes", "checks", "returns", "ignores", "counts"]
OBJECTS = ["the file", "42 tokens", "a long list", "three values", "the cache", "1,000 bytes"]
ENDINGS = [".", "!", "?", "...", ";", " (again)."]


def zen() -> str:
    with contextlib.redirect_stdout(io.StringIO()):
        import this
    return codecs.decode(this.s, "rot13")


def docstrings(name: str) -> str:
    module = importlib.import_module(name)
    parts = [inspect.getdoc(module) or ""]
    for attr, obj in sorted(vars(module).items()):
        if not attr.startswith("_") and getattr(obj, "__module__", None) == module.__name__:
            parts.append(inspect.getdoc(obj) or "")
    return "\n\n".join(p for p in parts if p)[:MAX_CHARS_PER_MODULE]


def made_up_lines() -> list[str]:
    out = []
    for n in range(360):
        s, v = SUBJECTS[n % 6], VERBS[(n // 6) % 6]
        o, e = OBJECTS[(n * 5) % 6], ENDINGS[(n * 7) % 6]
        out.append(f"{n + 1:3d}. {s} {v} {o} at {n % 24:02d}:{(n * 13) % 60:02d}{e}")
    return out


def main(out: Path) -> None:
    sections = [zen(), LINES, "\n".join(made_up_lines())] + [docstrings(m) for m in MODULES]
    text = "\n\n".join(s.strip("\n") for s in sections) + "\n"
    out.write_text(text, encoding="utf-8")
    print(f"wrote {out} ({len(text.encode('utf-8'))} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main(Path(__file__).resolve().parents[1] / "mixtral_export" / "data" / "tiny_corpus.txt")
