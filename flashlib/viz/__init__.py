"""Figures and animations drawn from flashlib's algorithms. Import the submodule you need
(`flashlib.viz.stepthrough`, `flashlib.viz.hardware_plots`, ...)).
Step-throughs: stepthrough (FA1, FA2, backward, side by side), softmax_anim, matmul_tiles, waves; live
notebook widgets with static fallbacks: explorers.

Importing flashlib.viz (any submodule) sets the book's figure style once, in `style()`: a colour cycle that
stays distinct under the common colour-vision deficiencies, and, in Jupyter or Colab, figures drawn at twice
the pixel density (retina PNG), so that they stay sharp on a high-DPI screen."""
import matplotlib as mpl
from cycler import cycler

# Okabe and Ito, "Color Universal Design" (2002, https://jfly.uni-koeln.de/color/): colours told apart with
# protanopia, deuteranopia and tritanopia. The yellow, weak on white, comes last.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000", "#F0E442"]


def plain_log_ticks(ax, axis="both"):
    """Label a log axis with plain numbers at 1, 2 and 5 times each power of ten ('2', '5', '10', '1,000'),
    not '2×10¹' at every minor tick, which crowd each other when the axis spans about a decade."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    from .tables import number
    for a in ([ax.xaxis, ax.yaxis] if axis == "both" else [getattr(ax, axis + "axis")]):
        a.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        a.set_major_formatter(FuncFormatter(lambda v, _: number(v)))
        a.set_minor_formatter(NullFormatter())


def style():
    """The book's matplotlib defaults (rcParams) and, inside IPython, retina (2x) inline figures."""
    mpl.rcParams.update({"axes.prop_cycle": cycler(color=OKABE_ITO), "image.cmap": "viridis",
                         "axes.formatter.useoffset": False, "axes.formatter.limits": (-4, 6)})
    try:
        from IPython import get_ipython
        from matplotlib_inline.config import InlineBackend
    except ImportError:
        return
    if get_ipython() is not None:   # the inline backend reads this when it is (or was) activated
        InlineBackend.instance().figure_formats = {"retina"}


style()
