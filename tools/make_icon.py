"""Draws assets/icon.png, the studio's application icon (256×256): a dark rounded square with a
brush stroke of colour emerging from noise. Run with any Python that has Pillow:

    python3 tools/make_icon.py assets/icon.png
"""

import math
import random
import sys

from PIL import Image, ImageDraw, ImageFilter

SIZE = 256


def main(path):
    random.seed(7)
    icon = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rounded_rectangle((8, 8, SIZE - 8, SIZE - 8), radius=52, fill=255)
    background = Image.new("RGBA", (SIZE, SIZE), (24, 26, 34, 255))
    draw = ImageDraw.Draw(background)
    # Noise on the left, fading into a clean stroke on the right: denoising.
    for _ in range(2200):
        x, y = random.gauss(70, 30), random.gauss(128, 42)
        fade = max(0.0, 1.0 - x / 150)
        grey = int(90 + 120 * random.random())
        draw.point((x, y), fill=(grey, grey, grey, int(255 * fade)))
    stroke = Image.new("RGBA", (SIZE, SIZE), (0, 0, 0, 0))
    s = ImageDraw.Draw(stroke)
    for i in range(120):
        t = i / 119
        x = 60 + 150 * t
        y = 170 - 90 * t + 18 * math.sin(t * math.pi * 2)
        r, g, b = int(255 * (1 - t) + 90 * t), int(90 + 90 * t), int(140 + 115 * t)
        radius = 10 + 16 * math.sin(t * math.pi)
        s.ellipse((x - radius, y - radius, x + radius, y + radius), fill=(r, g, b, 230))
    stroke = stroke.filter(ImageFilter.GaussianBlur(1.2))
    background.alpha_composite(stroke)
    icon.paste(background, (0, 0), mask)
    icon.save(path)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "assets/icon.png")
