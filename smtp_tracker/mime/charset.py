"""Character sets of HTML parts: which codec, and decoding that can always be undone.

The charset is the MIME ``charset`` parameter (RFC 2045 §5.1, RFC 2046
§4.1.2), else an HTML ``<meta charset>`` or ``<meta http-equiv=Content-Type>``
near the start of the document, else UTF-8 when the octets are valid UTF-8.
Whenever the named codec cannot decode the octets strictly, or re-encoding
the text would not give the same octets back, the octets are read as
ISO-8859-1 instead: one character per octet, so re-encoding restores them
exactly (only ASCII markup is searched and only ASCII is inserted).  UTF-7
is the exception: another encoder may have written any character in base64
(``+ADw-`` for ``<``, RFC 2152), so its text is kept when it decodes, marked
not canonical, and the rewrite finds its offsets in the octets themselves.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ["CharsetError", "DecodedText", "decode_text", "meta_charset"]

#: Labels mail software writes that Python does not know, or knows as a narrower set.
_ALIASES = {
    "x-mac-cyrillic": "mac_cyrillic",
    "x-mac-roman": "mac_roman",
    "macintosh": "mac_roman",
    "ks_c_5601-1987": "cp949",
    "ks_c_5601": "cp949",
    "euc-kr": "cp949",
    "gb2312": "gbk",
    "x-gbk": "gbk",
    "x-sjis": "shift_jis",
    "windows-874": "cp874",
    "unicode-1-1-utf-7": "utf-7",
    "x-unknown": "",
    "unknown-8bit": "",
    "x-user-defined": "",
    "default": "",
}
_META = re.compile(
    rb"<meta\b[^>]*?charset\s*=\s*[\"']?\s*([A-Za-z0-9._:()+-]{1,40})", re.IGNORECASE
)
#: How far into the document a <meta> charset is looked for.
_META_WINDOW = 8192
_FALLBACK = "latin-1"


class CharsetError(ValueError):
    """The octets are in a charset that is not ASCII-compatible and cannot be decoded."""


@dataclass(frozen=True, slots=True)
class DecodedText:
    """An HTML part's text and how to turn it back into the same octets.

    :param text: the decoded text; ``text.encode(codec) == octets``.
    :param codec: a Python codec name.
    :param ascii_compatible: ASCII characters encode as themselves.
    :param defects: short texts on what was wrong with the declared charset.
    :param canonical: ``text.encode(codec) == octets``; False only for UTF-7
        that another encoder wrote (RFC 2152 lets it encode any character in
        base64, ``+ADw-`` for ``<``): the text is exact, but offsets into the
        octets are not those of the text encoded again.
    """

    text: str
    codec: str
    ascii_compatible: bool
    defects: tuple[str, ...]
    canonical: bool = True


def meta_charset(octets: bytes) -> str | None:
    """The charset an HTML ``<meta>`` element near the start declares, lowercased."""
    match = _META.search(octets, 0, _META_WINDOW)
    return match.group(1).decode("ascii").lower() if match else None


def _codec(label: str) -> str | None:
    label = label.strip().strip("\"'").lower()
    name = _ALIASES.get(label, label)
    if not name:
        return None
    try:
        return codecs.lookup(name).name
    except (LookupError, ValueError):  # ValueError: a label with a NUL in it
        return None


def _ascii_compatible(codec: str) -> bool:
    sample = '<img src="x" />\r\n=;:/'
    try:
        return sample.encode(codec) == sample.encode("ascii") and (
            codecs.decode(sample.encode("ascii"), codec) == sample
        )
    except (UnicodeError, LookupError):
        return False


def decode_text(octets: bytes, declared: str | None) -> DecodedText:
    """Decode an HTML part so that it can be encoded back to the same octets.

    :param declared: the MIME charset parameter, if any.
    :returns: the text with its codec; unknown or wrong charsets are recorded
        as defects and the fallback is used.
    :raises CharsetError: when the declared charset is not ASCII-compatible
        (UTF-16, UTF-32) and the octets do not decode with it: no fallback
        can find the markup then.
    """
    defects: list[str] = []
    candidates: list[str] = []
    for label, where in ((declared, "mime"), (meta_charset(octets), "meta")):
        if not label:
            continue
        codec = _codec(label)
        if codec is None:
            defects.append(f"unknown-charset:{label[:40]}")
            continue
        if where == "meta" and not _ascii_compatible(codec):
            continue  # HTML reads a <meta> UTF-16 label as UTF-8: it was read as ASCII
        candidates.append(codec)
        break  # the MIME parameter wins over <meta>
    declared_codecs = list(candidates)
    if octets.startswith(codecs.BOM_UTF8) and "utf-8" not in candidates:
        candidates.insert(0, "utf-8")
    if "utf-8" not in candidates:
        candidates.append("utf-8")
    for codec in candidates:
        try:
            text = octets.decode(codec)
            if text.encode(codec) == octets:
                return DecodedText(text, codec, _ascii_compatible(codec), tuple(defects))
            if codec == "utf-7" and octets.isascii():  # e.g. every "<" and ">" as base64
                return DecodedText(
                    text, codec, _ascii_compatible(codec), tuple(defects), canonical=False
                )
        except UnicodeError:
            pass
        if codec in declared_codecs:
            defects.append(f"not-decodable-as:{codec}")
            if not _ascii_compatible(codec):
                raise CharsetError(f"octets not decodable as {codec}")
    return DecodedText(octets.decode(_FALLBACK), _FALLBACK, True, tuple(defects))
