"""HPACK (RFC 7541) header block decoding for :mod:`appliance.net.h2core`.

The ``hpack`` library's Decoder cost ~25-50 µs per small block here (a logging call per
field, objects per field); this one does the same work in a few µs, and remembers the result
of blocks that neither read nor change the dynamic table (what our own peers send: static
indices and literals without indexing), so a repeated block costs one dict lookup. Huffman
strings are decoded by ``hpack``'s table-driven decoder.

It must never accept what RFC 7541 forbids: an index of 0 or beyond the tables, an integer
or string running past the block, a table size update after a field or above our limit, a
header list beyond the size cap. Each of these raises :class:`HpackError`, which the
connection turns into a COMPRESSION_ERROR (the dynamic table may be out of step after it).
"""

from __future__ import annotations

from collections import deque

from hpack import HPACKDecodingError
from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

Field = tuple[bytes, bytes]
STATIC: tuple[Field, ...] = tuple(HeaderTable.STATIC_TABLE)
"""RFC 7541 Appendix A, indices 1 to 61."""
ENTRY_OVERHEAD = 32
"""RFC 7541 §4.1: the size of a table entry is name + value + 32."""
MAX_INTEGER = 1 << 28
_CACHE_SIZE = 256


class HpackError(Exception):
    """The header block cannot be decoded."""


class Decoder:
    """Decodes the header blocks of one connection direction, in order."""

    def __init__(self, max_table_size: int = 4096, max_list_size: int = 1 << 16) -> None:
        self.limit = max_table_size
        """SETTINGS_HEADER_TABLE_SIZE we announced: the most the peer may set."""
        self.max_list_size = max_list_size
        self._max = max_table_size
        self._size = 0
        self._table: deque[Field] = deque()
        self._pure: dict[bytes, list[Field]] = {}
        self.pure = False
        """Whether the last block decoded left the dynamic table alone (then the same
        bytes always decode to the same, shared, list)."""

    def decode(self, block: bytes) -> list[Field]:
        """The (name, value) fields of one complete header block. Do not mutate the list:
        it may be shared with earlier calls."""
        fields = self._pure.get(block)
        if fields is not None:
            self.pure = True
            return fields
        fields, pure = self._decode(block)
        self.pure = pure
        if sum(len(n) + len(v) + ENTRY_OVERHEAD for n, v in fields) > self.max_list_size:
            raise HpackError("header list too large")
        if pure:
            if len(self._pure) >= _CACHE_SIZE:
                self._pure.clear()
            self._pure[block] = fields
        return fields

    def _decode(self, block: bytes) -> tuple[list[Field], bool]:
        """The fields, and whether the block left the dynamic table alone."""
        fields: list[Field] = []
        pure = True
        pos, end = 0, len(block)
        while pos < end:
            first = block[pos]
            if first & 0x80:  # indexed field
                index, pos = _integer(block, pos, 7)
                fields.append(self._entry(index))
                pure = pure and index <= len(STATIC)
            elif first & 0x40:  # literal with incremental indexing
                name, value, pos, _ = self._literal(block, pos, 6)
                fields.append((name, value))
                self._add(name, value)
                pure = False
            elif first & 0x20:  # dynamic table size update
                if fields:
                    raise HpackError("table size update after a field")
                size, pos = _integer(block, pos, 5)
                if size > self.limit:
                    raise HpackError(f"table size {size} above {self.limit}")
                self._max = size
                self._evict()
                pure = False  # changes state: a cached copy would skip the change
            else:  # literal without indexing (0000) or never indexed (0001)
                name, value, pos, dynamic = self._literal(block, pos, 4)
                fields.append((name, value))
                pure = pure and not dynamic
        return fields, pure

    def _literal(self, block: bytes, pos: int, prefix: int) -> tuple[bytes, bytes, int, bool]:
        index, pos = _integer(block, pos, prefix)
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = _string(block, pos)
        value, pos = _string(block, pos)
        return name, value, pos, index > len(STATIC)

    def _entry(self, index: int) -> Field:
        if 0 < index <= len(STATIC):
            return STATIC[index - 1]
        dynamic = index - len(STATIC) - 1
        if index == 0 or dynamic >= len(self._table):
            raise HpackError(f"no table entry {index}")
        return self._table[dynamic]

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if size > self._max:  # RFC 7541 §4.4: an entry larger than the table empties it
            self._table.clear()
            self._size = 0
            return
        self._table.appendleft((name, value))
        self._size += size
        self._evict()

    def _evict(self) -> None:
        while self._size > self._max:
            name, value = self._table.pop()
            self._size -= len(name) + len(value) + ENTRY_OVERHEAD


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """RFC 7541 §5.1: an integer with an N-bit prefix at ``pos``; it and the next position."""
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while pos < len(block):
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if value > MAX_INTEGER:
            raise HpackError("integer too large")
        if not octet & 0x80:
            return value, pos
        shift += 7
    raise HpackError("integer runs past the block")


def _string(block: bytes, pos: int) -> tuple[bytes, int]:
    """RFC 7541 §5.2: a string literal (raw or Huffman-coded) at ``pos``."""
    if pos >= len(block):
        raise HpackError("string missing")
    huffman = block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    stop = pos + length
    if stop > len(block):
        raise HpackError("string runs past the block")
    raw = block[pos:stop]
    if huffman:
        try:
            raw = decode_huffman(raw)
        except HPACKDecodingError as exc:
            raise HpackError(f"Huffman: {exc}") from None
    return raw, stop
