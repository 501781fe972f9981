"""Spec text placed into rendered Markdown, kept from changing the document's structure.

Row labels, titles and a reported row's system, source and reason are written by whoever wrote the spec. The spec
models already refuse line breaks in them (sferd.spec.models.TableText); these filters make the renderer safe on
its own too (a line break becomes a space), and escape what one line can still break: a `|` inside a table cell
would start a new column, a `]` inside a link's text would end the link early. Text without those characters comes
out unchanged, so tables of ordinary specs are byte for byte what they were before the filters existed.
"""

from __future__ import annotations

import re

_BREAKS = re.compile(r"\r\n|[\n\r\x0b\x0c\x85\u2028\u2029]")
# a run of backslashes right before a pipe: GFM splits cells at a `|` unless one backslash escapes it
_PIPE = re.compile(r"(\\*)\|")
_LINK_TEXT = re.compile(r"(\\*)([\[\]])")
# a run of backslashes ending the text: the template's next character (`)`, `]`) would be escaped by the last one
_TRAILING = re.compile(r"(\\+)\Z")


def one_line(text: object) -> str:
    """`text` with every line break replaced by a space."""
    return _BREAKS.sub(" ", str(text))


def table_cell(text: object) -> str:
    """`text` for one cell of a GFM table row: one line, every `|` escaped as `\\|`.

    Backslashes already before a pipe are doubled first (`a\\|b` shows as written, not as an escape that a second
    backslash then cancels), and so are backslashes ending the text (they would escape what the template writes
    next)."""
    return _TRAILING.sub(r"\1\1", _PIPE.sub(lambda m: m.group(1) * 2 + "\\|", one_line(text)))


def link_text(text: object) -> str:
    """`text` for the inside of `[...](...)`: one line, `[` and `]` escaped (same backslash rule as table_cell)."""
    return _TRAILING.sub(r"\1\1", _LINK_TEXT.sub(lambda m: m.group(1) * 2 + "\\" + m.group(2), one_line(text)))
