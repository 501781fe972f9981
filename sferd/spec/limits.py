"""Bounds on what a spec file may cost to read, and on how much of a user's value an error message echoes.

Specs are shared (pull requests, supplementary material), so `sferd-spec validate` must answer quickly and in a
few lines on *any* input, including a hostile one. Every bound here is far above what a real spec needs (the
committed ones are under 10 KB, nest 6 levels and hold a few hundred values), and each is checked before the
work it protects against: the byte cap before parsing, the nesting and node caps while composing, the alias
expansion cap before validation (which would otherwise walk every expansion: "billion laughs").
"""

from __future__ import annotations

import re
from typing import Any

# A spec file larger than this is refused before it is parsed (ruamel composes a few thousand values a second on a small CPU).
MAX_BYTES = 64 * 1024
# Mappings and lists nested deeper than this (the committed specs reach 6).
MAX_DEPTH = 24
# Values in the document after alias expansion: what validation would visit (table1, the largest committed spec, holds ~200).
MAX_NODES = 2_000
# Characters in one string value (descriptions are the longest, a few hundred characters).
MAX_STRING = 8_192
# Integers a spec may write at all (int64, what every consumer down the line can hold); fields bound further.
MAX_INT = 2**63 - 1
# Characters of a user's value echoed in an error message, and of a whole message.
MAX_ECHO = 60
MAX_MESSAGE = 400
# Control characters: C0 (line feed and tab included), DEL, C1 (NEL included) and the Unicode line and paragraph
# separators. The loader refuses them in strings but for line breaks and tabs, and escapes them in messages; table
# text refuses all of them (sferd.spec.models.TableText). The renderer replaces the same set with spaces
# (sferd.report.markdown keeps its own copy, checked equal by a test, so the spec package stays out of the render
# stage's code fingerprint).
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def shorten(text: str, limit: int = MAX_ECHO) -> str:
    """`text` cut to `limit` characters with a note of how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def echo(value: Any) -> str:
    """A user's value for an error message: its repr (control characters escaped), bounded in length.

    The repr of a huge int is itself a quadratic-time conversion, so only its size is shown."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"<an integer of {value.bit_length()} bits>"
    if isinstance(value, str) and len(value) > 4 * MAX_ECHO:
        value = value[: 4 * MAX_ECHO]  # repr of a 10 MB string would copy it twice first
    return shorten(repr(value))


def one_of(choices: list[str]) -> str:
    """`choices` listed the way Pydantic's literal errors list them: `'a'`, `'a' or 'b'`, `'a', 'b' or 'c'`."""
    quoted = [f"'{c}'" for c in choices]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
