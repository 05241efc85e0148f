"""read_at_most: a body read whole across pieces, and cut just past its limit."""

from __future__ import annotations

import pytest

from libs.http_bodies import read_at_most


class Pieces:
    """A StreamReader's read(n): at most n bytes of what has arrived, b"" at the end."""

    def __init__(self, *pieces: bytes) -> None:
        self.pieces = list(pieces)
        self.asked: list[int] = []

    async def read(self, n: int) -> bytes:
        self.asked.append(n)
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
            piece = piece[:n]
        return piece


@pytest.mark.parametrize(
    ("pieces", "limit", "expected"),
    [
        ((b'{"a"', b": 1", b"}"), 100, b'{"a": 1}'),
        ((b"12345",), 5, b"12345"),  # exactly the limit: whole, nothing more asked for than one byte over
        ((b"123", b"456"), 5, b"123456"),  # one past the limit tells the caller it is too long
        ((b"123", b"4567890"), 5, b"123456"),
        ((), 5, b""),
    ],
)
async def test_read_at_most(pieces, limit, expected):
    stream = Pieces(*pieces)
    assert await read_at_most(stream, limit) == expected  # type: ignore[arg-type]
    assert all(n >= 1 for n in stream.asked)
