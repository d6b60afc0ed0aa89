"""Removal of Project Gutenberg headers, license text and "small print".

Two generations of boilerplate occur (see ``shared/data/README.md`` for a census):

* modern (2004 on): a header with Title/Author/Release Date, then a line
  ``*** START OF THE (or THIS) PROJECT GUTENBERG EBOOK <TITLE> ***``; at the end an optional
  ``End of the Project Gutenberg EBook of ...`` line, ``*** END OF THE/THIS ... ***`` and the
  full license;
* old-style (1990s to 2004): an etext header and the legal "small print", which ends with
  ``*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver...*END*``; at the end a line
  ``End of the Project Gutenberg Etext of ...``. Files from 2002-2004 may also carry the
  modern START/END markers.

The body starts after the last header marker before the first end marker, and ends at the
first end marker after it. Short credit paragraphs right after the header ("Produced
by ...", a repeated "The Project Gutenberg Etext of ..." title line) go too. A text without
any marker is returned unchanged apart from line endings and a BOM.
"""

import re
from typing import List

# Header ends: the modern START line, the old "small print" closing line.
_START_PATTERNS = [
    re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*$", re.I | re.M),
    re.compile(r"^[ \t]*\*+[ \t]*END\*?[ \t]*THE SMALL PRINT[^\n]*$", re.I | re.M),
]
# Body ends: the modern END line, and the "End of (the) Project Gutenberg('s) ..." line that
# precedes it in modern files and ends old-style ones.
_END_PATTERNS = [
    re.compile(r"^[ \t]*\*{3}[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG[^\n]*$", re.I | re.M),
    re.compile(
        r"^[ \t]*End of (?:the |this )?Project Gutenberg(?:'s|\u2019s)?\b[^\n]*$", re.I | re.M
    ),
]
# Leading paragraphs that are credits or repeated PG titles, not the book.
_CREDIT = re.compile(
    r"^\s*(?:(?:produced|prepared|transcribed|created|scanned|proofread|edited) by"
    r"|(?:this |an? )?e-?text (?:was |is )?(?:produced|prepared|created|scanned))",
    re.I,
)
# ... or short paragraphs about Project Gutenberg itself ("This is the February 1992 Project
# Gutenberg release of:", "The Project Gutenberg Etext of Persuasion by Jane Austen").
_PG_MENTION = re.compile(r"project gutenberg|\be-?texts?\b", re.I)
_SHORT_PARAGRAPH = 400
_MAX_CREDIT_PARAGRAPHS = 4
# DOS end-of-file characters that some 1990s files end with.
_TRAILING_JUNK = "\x1a \t\n"


def normalize_newlines(text: str) -> str:
    """Drop a leading BOM and turn CRLF / CR line endings into LF."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def _drop_credit_paragraphs(body: str) -> str:
    paragraphs: List[str] = re.split(
        r"\n[ \t]*\n", body.lstrip("\n"), maxsplit=_MAX_CREDIT_PARAGRAPHS
    )
    dropped = 0
    while dropped < min(_MAX_CREDIT_PARAGRAPHS, len(paragraphs) - 1):
        paragraph = paragraphs[dropped]
        is_pg_note = len(paragraph) < _SHORT_PARAGRAPH and _PG_MENTION.search(paragraph)
        if not (_CREDIT.match(paragraph) or is_pg_note):
            break
        dropped += 1
    if dropped == 0:
        return body
    return "\n\n".join(paragraphs[dropped:])


def strip_gutenberg(text: str) -> str:
    """The body of a Project Gutenberg text: header, license and small print removed.

    Args:
        text (str): a whole PG file (BOM and CRLF allowed).

    Returns:
        str: the book text with LF line endings, stripped of surrounding blank lines.
    """
    text = normalize_newlines(text)
    # The header ends at the last start marker before the first end marker.
    limit = len(text)
    for pattern in _END_PATTERNS:
        match = pattern.search(text)
        if match is not None:
            limit = min(limit, match.start())
    start = 0
    for pattern in _START_PATTERNS:
        for match in pattern.finditer(text, 0, limit):
            start = max(start, match.end())
    end = len(text)
    for pattern in _END_PATTERNS:
        match = pattern.search(text, start)
        if match is not None:
            end = min(end, match.start())
    body = text[start:end]
    if start > 0:
        body = _drop_credit_paragraphs(body)
    return body.strip(_TRAILING_JUNK)
