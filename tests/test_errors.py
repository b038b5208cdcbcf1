"""The one-line error idioms every report starts from."""

from __future__ import annotations

from distmlip.errors import error_summary, first_line


def test_first_line_of_a_message_and_the_summary():
    error = ValueError("  head line\nsecond line\n")
    assert first_line(error) == "head line"
    assert error_summary(error) == "ValueError: head line"


def test_an_empty_message_falls_back_to_the_type_or_the_default():
    assert first_line(RuntimeError()) == "RuntimeError"
    assert first_line(RuntimeError(" \n"), "") == ""
    assert error_summary(KeyError()) == "KeyError"
