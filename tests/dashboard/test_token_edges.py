"""The dashboard token file at its edge: exactly MIN_TOKEN_CHARS is a token, one less is not."""

from __future__ import annotations

import pytest

from fedbus.dashboard.security import MIN_TOKEN_CHARS, TokenFileError, read_token


def test_token_length_edge_and_whitespace(tmp_path):
    p = tmp_path / "token"
    p.write_text("x" * MIN_TOKEN_CHARS + "\n")
    assert read_token(p) == "x" * MIN_TOKEN_CHARS
    for bad in ("x" * (MIN_TOKEN_CHARS - 1), "x" * 8 + " " + "x" * 8):
        p.write_text(bad)
        with pytest.raises(TokenFileError, match=f"at least {MIN_TOKEN_CHARS} characters"):
            read_token(p)
