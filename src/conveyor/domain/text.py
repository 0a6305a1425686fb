"""Making untrusted job output safe to show in a terminal or a page.

Job output is hostile input: escape sequences can clear the screen, set the window title, write
the clipboard (OSC 52) or hide links (OSC 8); bidirectional controls can make text read
differently from what it is (Trojan Source). ``neutralise`` removes escape sequences and control
characters and makes bidi controls visible.
"""

from __future__ import annotations

import re
from functools import cache


@cache
def _patterns() -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """Escape sequences, control characters, bidi controls (compiled on first use)."""
    escapes = re.compile(
        r"""
        \x1b\[[0-?]*[ -/]*[@-~]          # CSI ... final byte (colours, cursor moves, clear screen)
      | \x1b\][^\x07\x1b]*(?:\x07|\x1b\\)?  # OSC ... BEL or ST (title, hyperlinks, clipboard)
      | \x1b[PX^_][^\x1b]*(?:\x1b\\)?     # DCS, SOS, PM, APC strings
      | \x1b[@-Z\\-_]                    # other two-byte escapes
      | \x1b                             # a lone ESC
      | \x9b[0-?]*[ -/]*[@-~]            # 8-bit CSI
        """,
        re.VERBOSE,
    )
    controls = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
    bidi = re.compile(r"[\u202a-\u202e\u2066-\u2069\u200e\u200f\u061c]")
    return escapes, controls, bidi


def neutralise(text: str) -> str:
    """``text`` without escape sequences or control characters (tab and newline are kept).

    A carriage return that is not part of CRLF becomes a newline, so progress bars stay
    readable; bidi controls are shown as ``<U+XXXX>``.
    """
    escapes, controls, bidi = _patterns()
    text = escapes.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = controls.sub("", text)
    return bidi.sub(lambda m: f"<U+{ord(m.group()):04X}>", text)


def inline(text: str) -> str:
    """``text`` neutralised for one line of a listing: no escape sequence nor control character
    at all (line breaks and tabs become spaces), for values users choose (an actor, a name)."""
    return neutralise(text).replace("\n", " ").replace("\t", " ")
