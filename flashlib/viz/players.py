"""The frame players of every step-through animation: matplotlib's JavaScript player with palette-PNG frames,
sized for the book's column, and the figure geometry they share."""
import base64
import io
import os
import tempfile

import matplotlib
from matplotlib import animation, rcParams
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

# Frames are drawn WIDTH = 7.5 inches wide at DPI = 210 (1575 px, over twice the column) and shown at the width of
# the book's content column, COLUMN_PX = 752 px in a 1280 px window (measured in Chromium by tests/test_browser.py),
# so one point of font shows as 752 / (72 * 7.5) = 1.39 px: FONT = 8 pt is 11.1 px on screen.
WIDTH = 7.5
FIGSIZE = (WIDTH, 7.0)
DPI = 210
COLUMN_PX = 752
FONT = 8


class _PaletteHTMLWriter(animation.HTMLWriter):
    """matplotlib's HTML player writer, embedding each frame as a PNG of at most 96 colours (a fraction of the
    bytes of a full-colour PNG; figures of flat colours and text look the same). Too many bytes for
    rcParams['animation.embed_limit'] is an error, not a silently shortened player."""

    def grab_frame(self, **savefig_kwargs):
        from PIL import Image
        buf, out = io.BytesIO(), io.BytesIO()
        self.fig.savefig(buf, format="png", dpi=self.dpi, **savefig_kwargs)
        Image.open(buf).convert("RGB").quantize(colors=96).save(out, format="png", optimize=True)
        data = base64.encodebytes(out.getvalue()).decode("ascii")
        self._total_bytes += len(data)
        if self._total_bytes >= self._bytes_limit:
            raise ValueError(f"the player's frames pass rcParams['animation.embed_limit'] "
                             f"({rcParams['animation.embed_limit']} MB): use fewer steps or a lower dpi")
        self._saved_frames.append(data)


def animate(draw, n_frames, figsize=FIGSIZE, dpi=DPI, interval=900):
    """Frame player HTML (matplotlib's JavaScript player, as to_jshtml makes it) for draw(fig, frame); frames are
    palette PNGs embedded in the page, drawn at `dpi` and shown as wide as the column."""
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    anim = animation.FuncAnimation(fig, lambda s: draw(fig, s), frames=n_frames, interval=interval, repeat=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "player.html")
        anim.save(path, writer=_PaletteHTMLWriter(fps=1000 / interval, embed_frames=True, default_mode="once"),
                  dpi=dpi)
        html = open(path).read()
    return html.replace('<img id="_anim_img', '<img style="width: 100%; height: auto" id="_anim_img', 1)


def embed_limit_bytes():
    return rcParams["animation.embed_limit"] * 1024 * 1024


def min_font_px(fig, column_px=COLUMN_PX):
    """The smallest text of `fig` in screen pixels when the figure is shown `column_px` wide."""
    sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip() and t.get_visible()]
    return min(sizes) * column_px / (72 * fig.get_figwidth())


def png(fig, dpi=None):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()
