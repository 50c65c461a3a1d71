"""The dependency-free PNG plotter: a valid PNG (chunks, CRCs, pixel data) of the requested size."""

import struct
import zlib

import pytest

from mixq.report.plot import Point, nice_ticks, read_png_size, scatter_png, tick_label


def parse_png(data: bytes) -> dict:
    """Walk every chunk, check its CRC, and decode the 8-bit RGB pixel rows (filter 0 only)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF, kind
        chunks.append((kind, body))
        pos += 12 + n
    assert [k for k, _ in chunks][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    w, h, depth, ctype, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, ctype, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = zlib.decompress(b"".join(b for k, b in chunks if k == b"IDAT"))
    assert len(raw) == h * (1 + 3 * w)
    rows = [raw[y * (1 + 3 * w):(y + 1) * (1 + 3 * w)] for y in range(h)]
    assert all(r[0] == 0 for r in rows)
    pixels = {tuple(r[1 + 3 * x:4 + 3 * x]) for r in rows for x in range(0, w, 3)}
    return {"width": w, "height": h, "colors": pixels, "rows": rows}


def test_scatter_is_a_valid_png_of_the_right_size():
    pts = [Point(4.5, 0.0067, "mixq", "mixq"), Point(4.62, 0.0105, "uniform 4:64", "uniform"),
           Point(5.26, 0.0098, "mixed_4_6", "other")]
    data = scatter_png(pts, title="KL vs size", xlabel="bits per weight", ylabel="KL", width=640, height=360)
    png = parse_png(data)
    assert (png["width"], png["height"]) == (640, 360) == read_png_size(data)
    assert (255, 255, 255) in png["colors"] and len(png["colors"]) > 3  # background plus drawing


def test_points_are_drawn_where_their_values_say():
    # one point: the mixq colour appears, and only in the plot area
    data = scatter_png([Point(1.0, 1.0, "", "mixq")], title="", xlabel="", ylabel="", width=300, height=200)
    png = parse_png(data)
    hits = [(x, y) for y, r in enumerate(png["rows"]) for x in range(300) if tuple(r[1 + 3 * x:4 + 3 * x]) == (214, 69, 40)]
    assert hits
    assert all(90 <= x <= 270 and 66 <= y <= 140 for x, y in hits)


def test_read_png_size_rejects_other_files():
    with pytest.raises(ValueError):
        read_png_size(b"GIF89a" + b"\0" * 30)


def test_nice_ticks_cover_the_range():
    t = nice_ticks(4.3, 5.4)
    assert t[0] <= 4.3 and t[-1] >= 5.4 and 3 <= len(t) <= 8
    steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
    assert len(steps) == 1
    assert nice_ticks(0, 0.0107)[-1] >= 0.0107
    assert tick_label(0) == "0" and tick_label(0.005) == "0.005" and tick_label(2.5e-5) == "2.5e-5"


def test_nothing_to_plot_is_an_error():
    with pytest.raises(ValueError):
        scatter_png([Point(float("nan"), 1.0, "x")], title="", xlabel="", ylabel="")
