"""C-FIND response identifiers encoded by hand: the bytes pydicom writes, without a Dataset.

A C-FIND answer is thousands of small identifiers with the same handful of elements. Building a
pydicom Dataset for each and letting pydicom encode it cost about 0.4 ms per response (py-spy on
the running node, docs/BENCHMARKS.md); an :class:`IdentifierEncoder` is built once per query
from the elements to return, in tag order, and writes each response's bytes directly
(about 20 µs for eight elements).

It covers what the index holds: text in the character set the responses declare (ISO_IR 192,
UTF-8), ASCII-only VRs, unsigned shorts, integer strings, and empty values of any VR (an empty
sequence included). Anything else (a value pydicom would convert, reject or encode in another
way: a non-ASCII code string, an IS that is not a plain integer, a number out of range, a value
too long for its length field) makes :meth:`IdentifierEncoder.encode` return None, and the
caller builds that one response with pydicom as before. ``tests/test_find_dimse.py`` compares
the bytes with pydicom's for every key the node answers.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Sequence
from typing import Any

# VRs encoded in the dataset's character set (pydicom's "text VRs": ISO_IR 192 is UTF-8).
CHARSET_VRS = frozenset({"PN", "SH", "LO", "ST", "LT", "UC", "UT"})
# VRs pydicom writes as they are (its default encoding): ASCII only here.
ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})
# Explicit VR: these have a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_PLAIN_INTEGER = re.compile(r"[-+]?[0-9]+\Z")
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class NotEncodable(Exception):
    """A value this module does not encode; the caller uses pydicom for that response."""


def value_bytes(vr: str, value: Any) -> bytes:
    """``value`` (a str, an int for US, or None) as pydicom writes it for ``vr``, padded to even length.

    Raises :class:`NotEncodable` where pydicom would do anything but the obvious.
    """
    if value is None:
        return b""
    if vr == "US":
        if type(value) is not int or not 0 <= value <= 0xFFFF:
            raise NotEncodable
        return _U16.pack(value)
    if type(value) is not str:
        raise NotEncodable
    if vr in CHARSET_VRS:
        raw = value.encode("utf-8")
    elif vr in ASCII_VRS:
        if not value.isascii() or (vr == "UI" and value != value.strip()):
            raise NotEncodable  # (pydicom's UID() would strip it)
        raw = value.encode("ascii")
    elif vr == "IS":
        if not _PLAIN_INTEGER.match(value):
            raise NotEncodable  # (pydicom's IS() converts or refuses it)
        raw = value.encode("ascii")
    else:
        raise NotEncodable
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw


def element_header(tag: int, vr: str, length: int, implicit_vr: bool) -> bytes:
    """The header of a data element (Little Endian), explicit or implicit VR."""
    head = _TAG.pack(tag >> 16, tag & 0xFFFF)
    if implicit_vr:
        return head + _U32.pack(length)
    if vr in LONG_VRS:
        return head + vr.encode("ascii") + b"\0\0" + _U32.pack(length)
    if length > 0xFFFF:
        raise NotEncodable  # (a 2-byte length field)
    return head + vr.encode("ascii") + _U16.pack(length)


Field = tuple[int, str, Callable[[Any], Any] | None, Any]
"""(tag, VR, getter of the value from a match or None, the value when there is no getter)."""


class IdentifierEncoder:
    """The response identifier of each match of one query, as bytes.

    ``fields`` are the identifier's elements in any order (they are written in tag order, as
    pydicom writes a dataset): constant values (Specific Character Set, Query/Retrieve Level,
    Retrieve AE Title), empty elements, and getters that read a value from a match. Only
    :data:`CHARSET_VRS` text, :data:`ASCII_VRS`, US, IS and empty values of any VR are taken.
    """

    def __init__(self, fields: Sequence[Field], implicit_vr: bool) -> None:
        self.implicit_vr = implicit_vr
        ordered = sorted(fields, key=lambda f: f[0])
        tags = [f[0] for f in ordered]
        if len(set(tags)) != len(tags):
            raise ValueError("an identifier names each element once")
        # Constant elements are encoded once; each getter's element on every call.
        self._parts: list[bytes | tuple[int, str, Callable[[Any], Any]]] = []
        for tag, vr, getter, value in ordered:
            if getter is None:
                raw = value_bytes(vr, value)
                self._parts.append(element_header(tag, vr, len(raw), implicit_vr) + raw)
            else:
                self._parts.append((tag, vr, getter))

    def encode(self, match: Any) -> bytes | None:
        """The identifier for ``match``, or None if a value is not :func:`value_bytes`' kind."""
        out = []
        implicit = self.implicit_vr
        try:
            for part in self._parts:
                if type(part) is bytes:
                    out.append(part)
                    continue
                tag, vr, getter = part  # type: ignore[misc]
                raw = value_bytes(vr, getter(match))
                out.append(element_header(tag, vr, len(raw), implicit))
                out.append(raw)
        except NotEncodable:
            return None
        return b"".join(out)
