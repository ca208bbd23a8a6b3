"""The pixels of a heatmap Secondary Capture: radiograph, heatmap above a floor, colour scale and caption.

A radiologist reads this image in a viewer that may show nothing else of BoneBridge's output, so it must say
what it shows without the SR:

- the radiograph stays grey where the heatmap is below :data:`HEATMAP_FLOOR` and is tinted only above it, in
  proportion to how far above, so bone and soft tissue stay readable; the colour scale on the right shows the
  floor (grey below it) and is labelled with Pillow's own scalable font;
- a caption band *below* the image (never over anatomy) states the finding in words, the model and its version,
  what the colours are, and "Research use only - not for diagnosis".

Text is drawn with ``PIL.ImageFont.load_default(size=...)`` (a FreeType font bundled with Pillow), sized to the
image so it reads the same on a 600 px and a 1024 px capture.
"""

from __future__ import annotations

import textwrap

import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont

SC_MAX_SIDE = 1024
#: Smaller radiographs are enlarged to this long side so the caption and scale labels stay legible.
SC_MIN_SIDE = 512
HEATMAP_ALPHA = 0.45
HEATMAP_COLORMAP = "turbo"
#: Heat below this is not drawn: the radiograph shows through unchanged (the scale shows the floor in grey).
HEATMAP_FLOOR = 0.2
RESEARCH_NOTICE = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"


def picture_shape(rows: int, cols: int) -> tuple[int, int]:
    """The radiograph's size inside the SC: long side capped at SC_MAX_SIDE, raised to SC_MIN_SIDE."""
    long_side = max(rows, cols)
    scale = min(SC_MAX_SIDE / long_side, max(1.0, SC_MIN_SIDE / long_side))
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear resize of a float map (upsampling a model's coarse map, or shrinking a smooth one)."""
    if image.shape == (rows, cols):
        return image.astype(np.float32, copy=False)
    # A map larger than the picture is already smooth (it was upsampled from the model's grid): every n-th value
    # is as good as an antialiased average, at a fraction of the cost on a 2000 px map.
    method = Image.Resampling.NEAREST if image.shape[0] > rows and image.shape[1] > cols else Image.Resampling.BILINEAR
    resized = Image.fromarray(np.ascontiguousarray(image, dtype=np.float32)).resize((cols, rows), method)
    return np.asarray(resized, dtype=np.float32)


def to_grey8(gray: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8, rounded, in two passes over one scratch buffer (a 2000 px image is 4 M pixels)."""
    scaled = np.multiply(gray, 255.0, dtype=np.float32)
    np.clip(scaled, 0.0, 255.0, out=scaled)
    scaled += 0.5
    return scaled.astype(np.uint8)


def _resize_grey(gray: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The radiograph at the picture's size as uint8: resized as 8 bits, which is what the SC keeps anyway."""
    grey8 = gray if gray.dtype == np.uint8 else to_grey8(gray)
    if grey8.shape != (rows, cols):
        grey8 = np.asarray(Image.fromarray(grey8).resize((cols, rows), Image.Resampling.BILINEAR))
    return grey8


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def blend_above_floor(base: np.ndarray, heat: np.ndarray, floor: float = HEATMAP_FLOOR,
                      alpha: float = HEATMAP_ALPHA) -> np.ndarray:
    """uint8 RGB: ``base`` (grey: uint8, or floats in [0, 1]) coloured by ``heat`` ([0, 1]) where heat exceeds ``floor``.

    Only the pixels above the floor are coloured and blended (a learnt fracture map is above it on a small part of
    the image), the rest is the grey copied into three channels: a third of the time of blending every pixel.
    """
    grey = base if base.dtype == np.uint8 else to_grey8(base)
    above = heat > floor
    if above.mean() > 0.5:  # a dense map (Grad-CAM): selecting pixels would cost more than it saves
        return _blend(grey, np.asarray(heat, dtype=np.float32), floor, alpha)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if above.any():
        rgb[above] = _blend(grey[above], heat[above].astype(np.float32), floor, alpha)
    return rgb


def _blend(grey: np.ndarray, heat: np.ndarray, floor: float, alpha: float) -> np.ndarray:
    """uint8 RGB of uint8 ``grey`` pixels tinted by the colour of ``heat`` in proportion to how far above ``floor``."""
    colour = matplotlib.colormaps[HEATMAP_COLORMAP](heat, bytes=True)[..., :3].astype(np.float32)
    weight = (alpha * np.clip((heat - floor) / max(1e-6, 1.0 - floor), 0.0, 1.0))[..., None]
    under = grey.astype(np.float32)[..., None]
    return (under + weight * (colour - under) + 0.5).astype(np.uint8)


def _scale_strip(rows: int, font_size: int, floor: float) -> np.ndarray:
    """The colour scale: turbo from the floor to 1, grey below the floor, labelled 1.0 / floor / 0."""
    font = _font(font_size)
    label_width = int(font.getlength("0.00")) + font_size // 2
    bar_width = max(8, font_size)
    margin = max(2, font_size // 3)
    width = margin + bar_width + margin + label_width
    strip = Image.new("RGB", (width, rows), "black")
    top, bottom = margin + font_size // 2, rows - margin - font_size // 2
    if bottom - top >= 8:
        values = np.linspace(1.0, 0.0, bottom - top)
        colours = matplotlib.colormaps[HEATMAP_COLORMAP](values)[:, :3]
        grey = np.full_like(colours, 0.35)
        bar = np.where((values >= floor)[:, None], colours, grey)
        bar_pixels = np.round(bar * 255).astype(np.uint8)[:, None, :].repeat(bar_width, axis=1)
        strip.paste(Image.fromarray(bar_pixels), (margin, top))
        draw = ImageDraw.Draw(strip)
        for value in (1.0, floor, 0.0):
            y = top + round((1.0 - value) * (bottom - top - 1))
            draw.line([(margin + bar_width, y), (margin + bar_width + margin // 2 + 1, y)], fill="white")
            draw.text((margin * 2 + bar_width, y), f"{value:.1f}", fill="white", font=font, anchor="lm")
    return np.asarray(strip)


def _caption_band(lines: list[str], width: int, font_size: int) -> np.ndarray:
    """White text on black, wrapped to ``width``; the research notice last, in amber."""
    font = _font(font_size)
    chars = max(16, int(width / max(1.0, font.getlength("x"))) - 2)
    wrapped: list[tuple[str, str]] = []
    for line in [*lines, RESEARCH_NOTICE]:
        colour = (255, 191, 0) if line == RESEARCH_NOTICE else (255, 255, 255)
        wrapped += [(part, colour) for part in textwrap.wrap(line, chars) or [""]]
    step = round(font_size * 1.3)
    pad = max(4, font_size // 2)
    band = Image.new("RGB", (width, pad * 2 + step * len(wrapped)), "black")
    draw = ImageDraw.Draw(band)
    for k, (text, colour) in enumerate(wrapped):
        draw.text((pad, pad + k * step), text, fill=colour, font=font)
    return np.asarray(band)


def render_heatmap(gray: np.ndarray, heatmap: np.ndarray, caption: list[str] | None = None,
                   floor: float = HEATMAP_FLOOR) -> np.ndarray:
    """uint8 RGB: ``heatmap`` (any size, [0, 1]) over ``gray``, a colour scale on the right, the caption below.

    The radiograph's long side is kept between :data:`SC_MIN_SIDE` and :data:`SC_MAX_SIDE` (:func:`picture_shape`):
    the SC is for looking at, not for measuring.
    """
    heat = np.asarray(heatmap, dtype=np.float32).squeeze()
    if heat.ndim != 2 or heat.size == 0:
        raise ValueError(f"heatmap must be a 2-D array, got shape {np.shape(heatmap)}")
    rows, cols = picture_shape(*gray.shape)
    base = _resize_grey(gray, rows, cols)
    heat = np.clip(np.nan_to_num(_resize(heat, rows, cols), nan=0.0), 0.0, 1.0)
    image = blend_above_floor(base, heat, floor)
    font_size = max(10, round(max(rows, cols) / 60))
    picture = np.concatenate([image, _scale_strip(rows, font_size, floor)], axis=1)
    if caption is None:
        return picture
    band = _caption_band(caption, picture.shape[1], max(10, round(picture.shape[1] / 70)))
    return np.concatenate([picture, band], axis=0)
