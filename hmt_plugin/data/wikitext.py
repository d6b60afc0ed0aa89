"""Splitting WikiText into articles.

WikiText files (and the rows of the Hugging Face ``wikitext`` dataset) hold one line of an
article per line, articles back to back. An article starts at a top-level heading line
`` = Title = ``; section headings have more ``=`` (`` = = Section = = ``). For long-document
language modelling each article is one document.
"""

from typing import Iterable, Iterator, List


def is_article_heading(line: str) -> bool:
    """True for a top-level WikiText heading such as ``" = Valkyria Chronicles III = "``."""
    s = line.strip()
    return (
        len(s) > 4
        and s.startswith("= ")
        and s.endswith(" =")
        and not s.startswith("= =")
        and not s.endswith("= =")
    )


def split_wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles.

    Args:
        lines (Iterable[str]): lines (with or without their newline), in order.

    Yields:
        str: one article per top-level heading (text before the first heading, if any, is
        yielded as its own document). Lines keep a trailing newline.
    """
    current: List[str] = []
    for line in lines:
        if is_article_heading(line) and any(x.strip() for x in current):
            yield "".join(current)
            current = []
        current.append(line if line.endswith("\n") else line + "\n")
    if any(x.strip() for x in current):
        yield "".join(current)
