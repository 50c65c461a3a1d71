"""A small dependency-free PNG plotter for the model card: quality against size, one point per quant.

What: `scatter_png(points, ...)` draws labelled points on linear axes with "nice" ticks and returns PNG
bytes (8-bit RGB, one zlib IDAT chunk); `read_png_size` reads a PNG's header back for checks.
Why: the card needs one plot. A raster canvas, a 5x7 bitmap font and a PNG encoder (zlib + crc32 from the
standard library) are a few hundred lines, where matplotlib would add a heavy dependency (and its font
cache) to every install for a single figure.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

# 5x7 bitmap font: 7 rows, top to bottom; bit 4 is the leftmost column. Text is drawn upper-cased.
_FONT = {
    "0": (0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E), "1": (0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E),
    "2": (0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F), "3": (0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E),
    "4": (0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02), "5": (0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E),
    "6": (0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E), "7": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08),
    "8": (0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E), "9": (0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C),
    "A": (0x0E, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11), "B": (0x1E, 0x11, 0x11, 0x1E, 0x11, 0x11, 0x1E),
    "C": (0x0E, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0E), "D": (0x1C, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1C),
    "E": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x1F), "F": (0x1F, 0x10, 0x10, 0x1E, 0x10, 0x10, 0x10),
    "G": (0x0E, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0F), "H": (0x11, 0x11, 0x11, 0x1F, 0x11, 0x11, 0x11),
    "I": (0x0E, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E), "J": (0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0C),
    "K": (0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11), "L": (0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1F),
    "M": (0x11, 0x1B, 0x15, 0x15, 0x11, 0x11, 0x11), "N": (0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11),
    "O": (0x0E, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "P": (0x1E, 0x11, 0x11, 0x1E, 0x10, 0x10, 0x10),
    "Q": (0x0E, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0D), "R": (0x1E, 0x11, 0x11, 0x1E, 0x14, 0x12, 0x11),
    "S": (0x0F, 0x10, 0x10, 0x0E, 0x01, 0x01, 0x1E), "T": (0x1F, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04),
    "U": (0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0E), "V": (0x11, 0x11, 0x11, 0x11, 0x11, 0x0A, 0x04),
    "W": (0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0A), "X": (0x11, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x11),
    "Y": (0x11, 0x11, 0x11, 0x0A, 0x04, 0x04, 0x04), "Z": (0x1F, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1F),
    " ": (0,) * 7, ".": (0, 0, 0, 0, 0, 0x0C, 0x0C), ",": (0, 0, 0, 0, 0x0C, 0x04, 0x08),
    ":": (0, 0x0C, 0x0C, 0, 0x0C, 0x0C, 0), "-": (0, 0, 0, 0x1F, 0, 0, 0), "_": (0, 0, 0, 0, 0, 0, 0x1F),
    "(": (0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02), ")": (0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08),
    "/": (0, 0x01, 0x02, 0x04, 0x08, 0x10, 0), "%": (0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03),
    "+": (0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0), "=": (0, 0, 0x1F, 0, 0x1F, 0, 0),
    "<": (0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02), ">": (0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08),
    "?": (0x0E, 0x11, 0x01, 0x02, 0x04, 0, 0x04),
}

WHITE, BLACK, GREY, LIGHT = (255, 255, 255), (30, 30, 30), (120, 120, 120), (225, 225, 225)
COLORS = {"mixq": (214, 69, 40), "uniform": (40, 100, 190), "other": (90, 150, 70)}


class Canvas:
    """An RGB raster with the few primitives a scatter plot needs."""

    def __init__(self, width: int, height: int, background=WHITE):
        if width < 1 or height < 1:
            raise ValueError(f"bad canvas size {width}x{height}")
        self.w, self.h = width, height
        self.px = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color) -> None:
        if 0 <= x < self.w and 0 <= y < self.h:
            i = 3 * (y * self.w + x)
            self.px[i:i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        for y in range(max(0, min(y0, y1)), min(self.h, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.w, max(x0, x1) + 1)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:  # Bresenham
            self.set(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def disc(self, cx: int, cy: int, r: int, color) -> None:
        for y in range(-r, r + 1):
            for x in range(-r, r + 1):
                if x * x + y * y <= r * r + r:
                    self.set(cx + x, cy + y, color)

    def diamond(self, cx: int, cy: int, r: int, color) -> None:
        for y in range(-r, r + 1):
            for x in range(-r, r + 1):
                if abs(x) + abs(y) <= r:
                    self.set(cx + x, cy + y, color)

    def text(self, x: int, y: int, s: str, color=BLACK, scale: int = 2) -> None:
        """Draw `s` with its top-left corner at (x, y)."""
        for k, ch in enumerate(s.upper()):
            rows = _FONT.get(ch, _FONT["?"])
            ox = x + k * 6 * scale
            for r, bits in enumerate(rows):
                for c in range(5):
                    if bits & (0x10 >> c):
                        self.rect(ox + c * scale, y + r * scale, ox + c * scale + scale - 1,
                                  y + r * scale + scale - 1, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.px[3 * y * self.w:3 * (y + 1) * self.w]) for y in range(self.h))
        return encode_png(self.w, self.h, raw)


def text_width(s: str, scale: int = 2) -> int:
    return max(0, len(s) * 6 * scale - scale)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, filtered_rows: bytes) -> bytes:
    """PNG bytes from rows that each start with a filter byte (0 here), 8-bit RGB."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(filtered_rows, 9))
            + _chunk(b"IEND", b""))


def read_png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR; ValueError when the bytes are not a PNG."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG file")
    return struct.unpack(">II", data[16:24])


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi] (1, 2, 2.5, 5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("ticks need finite limits")
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def tick_label(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.4g}"


@dataclass
class Point:
    x: float
    y: float
    label: str
    group: str = "other"  # mixq | uniform | other: colour and marker


def scatter_png(points: list[Point], *, title: str, xlabel: str, ylabel: str, width: int = 720,
                height: int = 440) -> bytes:
    """A labelled scatter plot as PNG bytes; y starts at 0 when every value is non-negative."""
    pts = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    if not pts:
        raise ValueError("nothing to plot")
    c = Canvas(width, height)
    left, right, top, bottom = 90, width - 30, 66, height - 60
    xs, ys = [p.x for p in pts], [p.y for p in pts]
    xpad = (max(xs) - min(xs)) * 0.15 or 0.5
    xt = nice_ticks(min(xs) - xpad, max(xs) + xpad)
    ylo = 0.0 if min(ys) >= 0 else min(ys)
    yt = nice_ticks(ylo, max(ys) * 1.15 if max(ys) > 0 else max(ys) + 1)
    x0, x1, y0, y1 = xt[0], xt[-1], yt[0], yt[-1]

    def px(x):
        return round(left + (x - x0) / (x1 - x0) * (right - left))

    def py(y):
        return round(bottom - (y - y0) / (y1 - y0) * (bottom - top))

    for t in xt:
        c.line(px(t), top, px(t), bottom, LIGHT)
        lab = tick_label(t)
        c.text(px(t) - text_width(lab) // 2, bottom + 8, lab, GREY)
    for t in yt:
        c.line(left, py(t), right, py(t), LIGHT)
        lab = tick_label(t)
        c.text(left - 8 - text_width(lab), py(t) - 7, lab, GREY)
    c.line(left, top, left, bottom, BLACK)
    c.line(left, bottom, right, bottom, BLACK)
    c.text(max(4, (width - text_width(title)) // 2), 12, title, BLACK)
    c.text(max(4, (left + right - text_width(xlabel)) // 2), height - 26, xlabel, BLACK)
    c.text(8, top - 30, ylabel, BLACK)
    for p in sorted(pts, key=lambda p: p.group == "mixq"):  # mixq drawn last, on top
        color = COLORS.get(p.group, COLORS["other"])
        cx, cy = px(p.x), py(p.y)
        if p.group == "mixq":
            c.disc(cx, cy, 7, color)
        elif p.group == "uniform":
            c.rect(cx - 5, cy - 5, cx + 5, cy + 5, color)
        else:
            c.diamond(cx, cy, 7, color)
        w = text_width(p.label)
        lx = cx + 12 if cx + 12 + w < width - 4 else cx - 12 - w
        c.text(lx, cy - 7, p.label, color)
    return c.png()
