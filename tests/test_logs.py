from __future__ import annotations

import logging
import time

import pytest

from fl.common.logs import PEER_TEXT_LIMIT, sanitize, setup_logging


@pytest.mark.parametrize("text", ["", "plain text", "ümlaut ok", "a\\b 'quoted' \"x\""])
def test_printable_text_passes_unchanged(text):
    assert sanitize(text) == text


@pytest.mark.parametrize("raw,escaped", [
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),  # terminal escape sequences
    ("ok\r\n12:00:00 INFO server: forged", "ok\\r\\n12:00:00 INFO server: forged"),  # log forging
    ("tab\there", "tab\\there"),
    ("nul\x00bell\x07del\x7f", "nul\\x00bell\\x07del\\x7f"),
    ("bidi\u202eevil", "bidi\\u202eevil"),  # right-to-left override
    ("line\u2028sep", "line\\u2028sep"),
    ("lone\ud800surrogate", "lone\\ud800surrogate"),
])
def test_control_characters_are_escaped(raw, escaped):
    out = sanitize(raw)
    assert out == escaped
    assert out.isprintable()


def test_length_is_bounded_and_the_cut_is_said():
    out = sanitize("x" * 10_000)
    assert out.startswith("x" * PEER_TEXT_LIMIT) and len(out) < PEER_TEXT_LIMIT + 40
    assert "9800 more chars" in out
    assert len(sanitize("y" * 50, limit=10)) < 40


def test_escapes_count_towards_the_limit():
    out = sanitize("\x1b" * 10_000, limit=100)
    assert len(out) < 140 and out.isprintable()


def test_huge_input_is_cheap():
    text = "\x1b" * 5_000_000
    t0 = time.process_time()
    sanitize(text)
    assert time.process_time() - t0 < 0.5  # stops at the limit, does not walk 5 M chars


def test_non_strings_go_through_a_bounded_repr():
    deep: list = []
    for _ in range(100_000):  # str() of this raises RecursionError
        deep = [deep]
    out = sanitize(deep)
    assert out.isprintable() and len(out) < 50
    assert sanitize(b"\x1b[31m") == "b'\\x1b[31m'"
    assert len(sanitize(list(range(100_000)))) < PEER_TEXT_LIMIT + 40


def test_setup_logging_levels():
    setup_logging(quiet=True)
    assert logging.getLogger().level == logging.WARNING
    setup_logging(verbose=True)
    assert logging.getLogger().level == logging.DEBUG
    setup_logging()
    assert logging.getLogger().level == logging.INFO
    assert len(logging.getLogger().handlers) == 1
