"""The book's one table helper: `table(headers, rows)` gives an object that Jupyter, Colab and the book show as
a table (its Markdown, rendered by MyST-NB with `nb_render_markdown_format: myst`) and that print() shows as
aligned plain text. Numbers are formatted without exponents and their columns are right-aligned."""
import math
import re

# A cell that reads as a number: "2,039", "1.5", "3.2×", "85%", "12k", or several joined by " / ".
_NUM = r"[-+−]?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?\s?[×x%k]?"
NUMERIC = re.compile(rf"^{_NUM}(?: / {_NUM})*$")
EMPTY = ("", "–", "-", "?")


def number(x, digits=4):
    """A number for a reader: thousands separators, at most `digits` significant digits, no trailing zeros, no
    exponent between 1e-3 and 1e15 ('2,119', '33,200', '0.9412', '8.1'); integers in full."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    if isinstance(x, int):
        return f"{x:,}"
    if not math.isfinite(x):
        return "–" if math.isnan(x) else str(x)
    if x == 0:
        return "0"
    if not 1e-3 <= abs(x) < 1e15:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(x))))
    text = f"{x:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _cell(x):
    return "–" if x is None else number(x)


def _is_number(x):
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) or bool(NUMERIC.match(str(x).strip()))


class Table:
    """headers and rows of cells (str, int, float or None); rich display as a Markdown table."""

    def __init__(self, headers, rows):
        self.headers = [str(h) for h in headers]
        self.rows = [list(r) for r in rows]
        bad = [r for r in self.rows if len(r) != len(self.headers)]
        if bad:
            raise ValueError(f"every row needs {len(self.headers)} cells, one per header; got {len(bad[0])}: {bad[0]}")
        self.cells = [[_cell(x) for x in r] for r in self.rows]
        self.right = [all(_is_number(r[c]) for r in self.rows if _cell(r[c]) not in EMPTY) and
                      any(_cell(r[c]) not in EMPTY for r in self.rows) for c in range(len(self.headers))]

    def markdown(self):
        esc = lambda s: s.replace("|", "\\|").replace("\n", " ")
        lines = ["| " + " | ".join(esc(h) for h in self.headers) + " |",
                 "|" + "|".join("---:" if r else "---" for r in self.right) + "|"]
        lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in self.cells]
        return "\n".join(lines)

    _repr_markdown_ = markdown

    def __str__(self):
        """Aligned plain text (a terminal, print()): links shown by their text, numbers right-aligned."""
        plain = lambda s: re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", s).replace("**", "")
        grid = [[plain(h) for h in self.headers]] + [[plain(c) for c in row] for row in self.cells]
        widths = [max(len(r[c]) for r in grid) for c in range(len(self.headers))]
        line = lambda r: "  ".join(s.rjust(w) if right else s.ljust(w)
                                   for s, w, right in zip(r, widths, self.right)).rstrip()
        return "\n".join([line(grid[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in grid[1:]])

    __repr__ = __str__


def table(headers, rows):
    """A table to display() in a notebook (or print()); see Table."""
    return Table(headers, rows)
