"""Spec text placed into rendered Markdown, kept from changing the document's structure.

Row labels, titles and a reported row's system, source and reason are written by whoever wrote the spec. Markdown
in them is rendered (`*x*` shows in italics); these filters escape only what could reach past the text's own place
in the document: a line break (ends a table row or the heading), a `|` in a table cell (starts a new column), a `]`
or `[` in a link's text (ends the link early), a backtick (a code span that runs across the links or the words after
it) and a `<` (raw HTML: an unclosed `<details>` or `<div>` hides the rest of the page on GitHub). Text without those
characters comes out unchanged, so tables of ordinary specs are byte for byte what they were before the filters
existed.

The spec models refuse control characters in this text already (sferd.spec.models.TableText); the filters make the
renderer safe on its own too (params edited by hand), and replace the same set of characters with a space.
"""

from __future__ import annotations

import re

# Every character the spec models refuse in table text (sferd.spec.limits.CONTROL, the same pattern, which a test
# checks): line breaks of every kind a Markdown parser or a reader may honour, tabs and the other control characters.
# Written out here rather than imported so the render stage's code fingerprint does not cover the spec package.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# A backslash run ending the text: the template's next character (`)`, `]`, `*`) would be escaped by the last one.
_TRAILING = re.compile(r"(\\+)\Z")


def _escaper(chars: str):
    """A function escaping each of `chars` in a text: `<` becomes the entity `&lt;` (never the start of a tag, shown
    as `<`), any other character gets a backslash.

    A run of backslashes right before an escaped character is doubled: the user's backslashes then show as written
    instead of escaping the added backslash (a `\\`` would leave the backtick bare) or the entity's `&`."""
    pattern = re.compile(rf"(\\*)([{re.escape(chars)}])")

    def escape(m: re.Match) -> str:
        c = m.group(2)
        return m.group(1) * 2 + ("&lt;" if c == "<" else "\\" + c)

    return lambda text: _TRAILING.sub(r"\1\1", pattern.sub(escape, one_line(text)))


def one_line(text: object) -> str:
    """`text` with every line break and other control character replaced by a space."""
    return _CONTROL.sub(" ", str(text))


# A table cell: cmark-gfm (GitHub) splits a row at every `|` that does not follow a backslash, whatever precedes
# that backslash, then drops the backslash of each `\|` before the cell's inline parsing. So `\|` alone keeps the
# column count; the user's own backslashes before a `|` are doubled so that they survive that parsing and show as
# written (`a\|b` → `a\\\|b` → `a\\|b` → shows `a\|b`). Code spans and HTML cannot cross a cell boundary, but an
# HTML tag opened in a cell reaches past the table on GitHub, so `<` is escaped too.
_cell = _escaper("|<")
# Inside `[...](...)`, one paragraph holding every sample-grid link: brackets would end the link early, a backtick
# could open a code span that swallows the next link's `](`, a `<` an HTML tag or declaration spanning links.
_link = _escaper("[]`<")
# Headings and sentences of the template: a backtick or `<` would reach the words (or the page) after the text.
_prose = _escaper("`<")


def table_cell(text: object) -> str:
    """`text` for one cell of a GFM table row: one line, `|` escaped as `\\|`, `<` as `&lt;` (see _cell)."""
    return _cell(text)


def link_text(text: object) -> str:
    """`text` for the inside of `[...](...)`: one line, `[`, `]` and backticks escaped, `<` as `&lt;`."""
    return _link(text)


def prose(text: object) -> str:
    """`text` inside a heading or sentence of the page: one line, backticks escaped, `<` as `&lt;`."""
    return _prose(text)
