"""Reading a whole HTTP body with aiohttp, up to a limit."""

from __future__ import annotations

import aiohttp


async def read_at_most(content: aiohttp.StreamReader, limit: int) -> bytes:
    """The body up to its end, or its first `limit` + 1 bytes when it is longer than `limit`.

    `StreamReader.read(n)` returns what has arrived so far, not n bytes: a body that comes in
    pieces (a slow network, TLS records, a large reply) would be cut at the first one.
    """
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)
