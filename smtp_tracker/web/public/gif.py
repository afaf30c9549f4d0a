"""The tracking pixel: a 1x1 transparent GIF89a, 43 bytes.

Layout (GIF89a specification, W3C/CompuServe 1990): header ``GIF89a``; logical
screen 1x1 with a 2-entry global colour table (black, white); a Graphic
Control Extension marking colour 0 transparent; one 1x1 image, LZW minimum
code size 2, data ``44 01``; trailer ``3B``.
"""

from typing import Final

__all__ = ["GIF_CONTENT_TYPE", "TRANSPARENT_GIF"]

TRANSPARENT_GIF: Final[bytes] = (
    b"GIF89a"
    b"\x01\x00\x01\x00\x80\x00\x00"  # 1x1, global colour table of 2 entries
    b"\x00\x00\x00\xff\xff\xff"  # colours: black, white
    b"\x21\xf9\x04\x01\x00\x00\x00\x00"  # GCE: transparent colour index 0
    b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00"  # image descriptor at 0,0, 1x1
    b"\x02\x02\x44\x01\x00"  # LZW min code size 2, one 2-byte sub-block, end
    b"\x3b"  # trailer
)
assert len(TRANSPARENT_GIF) == 43

GIF_CONTENT_TYPE: Final = "image/gif"
