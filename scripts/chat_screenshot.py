"""Render `triattn chat` to a PNG (docs/chat.png) with the real demo model, without a terminal or an SVG renderer.

Textual can only export SVG, and nothing on the build machine turns SVG into PNG (no cairosvg, rsvg-convert,
inkscape or browser), so this draws the screen itself: Textual's compositor renders the screen into Rich segments
(what its SVG export does), and Pillow paints each cell's background, glyph, bold/italic/underline in DejaVu Sans
Mono. Block elements (█ ▀ ▄ ▁ … the heatmap and borders) are painted as rectangles so they join without seams.

    python scripts/chat_screenshot.py [--out docs/chat.png] [--size 120x40] [--steps 50] [--threads N]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import random
import sys
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.segment import Segment
from rich.terminal_theme import DEFAULT_TERMINAL_THEME

FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
FONTS = {(False, False): "DejaVuSansMono.ttf", (True, False): "DejaVuSansMono-Bold.ttf",
         (False, True): "DejaVuSansMono-Oblique.ttf", (True, True): "DejaVuSansMono-BoldOblique.ttf"}


def screen_segments(app) -> list[list[Segment]]:
    """The current screen as lines of styled segments (the same render Textual's SVG export uses)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True, color_system="truecolor",
                      record=True, legacy_windows=False, safe_box=False)
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens,
                                                       simplify=True))
    segments = [s for s in console._record_buffer if not s.control]  # cursor moves between lines
    lines = list(Segment.split_lines(segments))
    return lines[:height]


def _rgb(color, default):
    if color is None or color.is_default:
        return default
    t = color.get_truecolor(DEFAULT_TERMINAL_THEME)
    return (t.red, t.green, t.blue)


def _block(ch: str, x: int, y: int, w: int, h: int):
    """The rectangle a block element covers, or None for other characters."""
    o = ord(ch)
    if o == 0x2588:
        return (x, y, x + w, y + h)
    if o == 0x2580:
        return (x, y, x + w, y + h // 2)
    if 0x2581 <= o <= 0x2587:  # lower eighths
        return (x, y + h - h * (o - 0x2580) // 8, x + w, y + h)
    if 0x2589 <= o <= 0x258F:  # left eighths, 7/8 down to 1/8
        return (x, y, x + w * (0x2590 - o) // 8, y + h)
    if o == 0x2590:
        return (x + w // 2, y, x + w, y + h)
    if o == 0x2594:
        return (x, y, x + w, y + max(1, h // 8))
    if o == 0x2595:
        return (x + w - max(1, w // 8), y, x + w, y + h)
    return None


def render_png(lines: list[list[Segment]], path: Path, font_size: int = 16) -> None:
    fonts = {k: ImageFont.truetype(str(FONT_DIR / v), font_size) for k, v in FONTS.items()}
    regular = fonts[(False, False)]
    cw = round(regular.getlength("M"))
    ascent, descent = regular.getmetrics()
    ch_h = ascent + descent
    cols = max(sum(len(s.text) for s in line) for line in lines)
    fg0 = (DEFAULT_TERMINAL_THEME.foreground_color.red, DEFAULT_TERMINAL_THEME.foreground_color.green,
           DEFAULT_TERMINAL_THEME.foreground_color.blue)
    bg0 = (DEFAULT_TERMINAL_THEME.background_color.red, DEFAULT_TERMINAL_THEME.background_color.green,
           DEFAULT_TERMINAL_THEME.background_color.blue)
    img = Image.new("RGB", (cols * cw, len(lines) * ch_h), bg0)
    draw = ImageDraw.Draw(img)
    for row, line in enumerate(lines):
        col = 0
        y = row * ch_h
        for seg in line:
            style = seg.style
            fg = _rgb(style.color if style else None, fg0)
            bg = _rgb(style.bgcolor if style else None, bg0)
            if style and style.reverse:
                fg, bg = bg, fg
            if style and style.dim:
                fg = tuple((a + b) // 2 for a, b in zip(fg, bg))
            font = fonts[(bool(style and style.bold), bool(style and style.italic))]
            for ch in seg.text:
                x = col * cw
                draw.rectangle((x, y, x + cw - 1, y + ch_h - 1), fill=bg)
                rect = _block(ch, x, y, cw, ch_h)
                if rect:
                    draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=fg)
                elif ch != " ":
                    draw.text((x, y), ch, font=font, fill=fg)
                if style and style.underline:
                    draw.line((x, y + ascent + 1, x + cw - 1, y + ascent + 1), fill=fg)
                col += 1
    img.save(path)


async def shoot(out: Path, size: tuple[int, int], steps: int, seed: int) -> None:
    from triattn_local.demo.task import make_problem
    from triattn_local.tui.app import ChatApp
    from triattn_local.tui.config import ChatConfig
    from triattn_local.tui.session import load_chat_session
    from triattn_local.tui.store import ChatStore

    # Short enough for a CPU, long enough for a few compression rounds; a window that covers the task's lag.
    config = ChatConfig(budget=512, divide_length=64, window=320, temperature=0, max_tokens=2048)
    chat = load_chat_session(config)
    problem = make_problem(random.Random(seed), steps=steps)
    with tempfile.TemporaryDirectory() as tmp:
        store = ChatStore(Path(tmp) / "chat.sqlite3")
        app = ChatApp(config, store, chat=chat)
        async with app.run_test(size=size) as pilot:
            await pilot.pause()
            await app.send(problem.prompt)
            while app.busy:
                await pilot.pause(0.1)
            await app.workers.wait_for_complete()
            await pilot.pause(0.5)
            render_png(screen_segments(app), out)
        store.close()
    print(f"wrote {out} (answer {problem.answer}; reply: {app.conversation.messages[-1].content[-30:]!r})",
          file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/chat.png")
    parser.add_argument("--size", default="120x40")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest on a busy small machine)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    asyncio.run(shoot(Path(args.out), (w, h), args.steps, args.seed))


if __name__ == "__main__":
    main()
