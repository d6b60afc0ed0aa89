"""Project Gutenberg boilerplate removal (modern, old-style, mixed, none) and WikiText articles."""

from hmt_plugin.data import split_wikitext_articles, strip_gutenberg
from tests.data_fixtures import MODERN_BODY, MODERN_BOOK, OLD_STYLE_BODY, OLD_STYLE_BOOK


def test_modern_markers_bom_and_crlf():
    assert strip_gutenberg(MODERN_BOOK) == MODERN_BODY


def test_modern_this_or_the_and_no_trailing_end_line():
    text = (
        "Title: X\n\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n\nX\n\nBody line.\n\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\n\nUpdated editions will replace...\n"
    )
    assert strip_gutenberg(text) == "X\n\nBody line."


def test_old_style_small_print_and_end_of_etext():
    assert strip_gutenberg(OLD_STYLE_BOOK) == OLD_STYLE_BODY


def test_old_style_small_print_is_removed_even_in_a_short_etext():
    # the header is most of this file; the body still starts after the small print
    book = OLD_STYLE_BOOK.replace("Why is this", "Why is this\n" + "lawyers. " * 200)
    assert strip_gutenberg(book) == OLD_STYLE_BODY


def test_2002_2004_files_with_both_kinds():
    text = (
        "The Project Gutenberg EBook of Y\n\n*** START OF THE PROJECT GUTENBERG EBOOK Y ***\n\n"
        "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN EBOOKS**START***\nlegal words\n"
        "*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*\n\n\n"
        "Y, a story.\n\nEnd of the Project Gutenberg EBook of Y\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK Y ***\n"
    )
    assert strip_gutenberg(text) == "Y, a story."


def test_text_without_markers_is_kept():
    body = "\ufeffTo Sherlock Holmes she is always THE woman.\r\nI have seldom heard him.\r\n"
    assert (
        strip_gutenberg(body)
        == "To Sherlock Holmes she is always THE woman.\nI have seldom heard him."
    )


def test_book_mentioning_the_end_in_its_text_is_not_cut():
    text = (
        "*** START OF THIS PROJECT GUTENBERG EBOOK Z ***\n\nZ\n\nAt the end of the day, the end of "
        "the Project was near.\nThe End\n\n*** END OF THIS PROJECT GUTENBERG EBOOK Z ***\nLICENSE"
    )
    assert (
        strip_gutenberg(text)
        == "Z\n\nAt the end of the day, the end of the Project was near.\nThe End"
    )


def test_wikitext_articles():
    lines = [
        " \n",
        " = A = \n",
        " \n",
        " text a . \n",
        " = = Sub = = \n",
        " more a . \n",
        " = B = \n",
        " text b . \n",
        " = = = Deep = = = \n",
    ]
    articles = list(split_wikitext_articles(lines))
    assert len(articles) == 2
    assert articles[0].startswith(" \n = A = ") and "more a" in articles[0]
    assert articles[1].startswith(" = B = ") and "Deep" in articles[1]
