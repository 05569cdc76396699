"""The retention heatmap: for each layer, which share of each position band the cache still keeps.

After a compression round the cache of (layer, KV head) holds the round's kept positions plus every token that came
after the round; a band's share is the kept fraction of its positions, averaged over KV heads. Rows are layers
(grouped when there are more layers than lines), columns are equal bands of positions 0 … logical length."""

from __future__ import annotations

import numpy as np
from rich.style import Style
from rich.text import Text
from textual.widgets import Static

from ..compression import RoundRecord

DROPPED, KEPT = (38, 38, 58), (78, 201, 128)  # colours of share 0 and share 1


class RetentionMap:
    """Kept positions per (layer, KV head) as of the last round."""

    def __init__(self, num_layers: int, num_kv_heads: int):
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.reset()

    def reset(self) -> None:
        self.kept: list[list[np.ndarray]] | None = None  # [layer][kv_head] → positions; None: nothing dropped yet
        self.step = 0  # positions from here on came after the round: all kept
        self.rounds = 0

    def update(self, record: RoundRecord) -> None:
        """Take a round's record; a None layer or head in it means the choice is shared by all of them."""
        kept = [[np.empty(0, np.int64)] * self.num_kv_heads for _ in range(self.num_layers)]
        for layer, head, positions in record.kept:
            arr = np.sort(np.asarray(positions, dtype=np.int64))
            for li in range(self.num_layers) if layer is None else [layer]:
                for hi in range(self.num_kv_heads) if head is None else [head]:
                    kept[li][hi] = arr
        self.kept, self.step, self.rounds = kept, record.step, record.round

    def shares(self, logical: int, bands: int) -> np.ndarray:
        """[layers, kv_heads, bands]: kept share of each band of positions 0 … logical - 1 (bands ≤ logical)."""
        bands = max(1, min(bands, logical))
        edges = np.linspace(0, logical, bands + 1).round().astype(np.int64)
        out = np.ones((self.num_layers, self.num_kv_heads, bands))
        if self.kept is None or logical == 0:
            return out
        size = np.maximum(np.diff(edges), 1)
        after = np.maximum(edges - self.step, 0)  # positions after the round below each edge: all kept
        for li, heads in enumerate(self.kept):
            for hi, positions in enumerate(heads):
                below = np.searchsorted(positions, np.minimum(edges, self.step)) + after  # kept positions < edge
                out[li, hi] = np.diff(below) / size
        return out


def colour(share: float) -> str:
    share = min(max(share, 0.0), 1.0)  # a bad record must not take the screen down with an invalid colour
    r, g, b = (round(d + (k - d) * share) for d, k in zip(DROPPED, KEPT))
    return f"#{r:02x}{g:02x}{b:02x}"


class RetentionHeatmap(Static):
    DEFAULT_CSS = """
    RetentionHeatmap { height: 1fr; border: round $primary; padding: 0 1; }
    """

    def __init__(self, **kwargs):
        super().__init__("", **kwargs)
        self.map: RetentionMap | None = None
        self.logical = 0
        self.border_title = "kept per layer"

    def reset(self, num_layers: int, num_kv_heads: int) -> None:
        self.map = RetentionMap(num_layers, num_kv_heads)
        self.logical = 0
        self.border_subtitle = "no round yet"
        self.refresh()

    def update_round(self, record: RoundRecord, logical: int) -> None:
        if self.map is not None:
            self.map.update(record)
            self.border_subtitle = f"round {record.round} at {record.step:,}"
        self.set_logical(logical)
        self.refresh()

    def set_logical(self, logical: int) -> None:
        if logical != self.logical:
            self.logical = logical
            self.refresh()

    def render(self) -> Text:
        if self.map is None:
            return Text("no model", style="dim")
        if self.logical == 0:
            return Text("empty cache", style="dim")
        m = self.map
        width, height = max(self.content_size.width, 8), max(self.content_size.height, 3)
        lines = height - 2  # the axis and the legend below the rows
        if lines >= m.num_layers * m.num_kv_heads and m.num_kv_heads > 1:  # room for every (layer, KV head)
            rows = [(f"L{li} h{hi}", [li], [hi]) for li in range(m.num_layers) for hi in range(m.num_kv_heads)]
        else:  # one row per layer, or per group of layers, averaged over KV heads
            heads = list(range(m.num_kv_heads))
            rows = [(_label(g), list(g), heads) for g in np.array_split(np.arange(m.num_layers),
                                                                         max(1, min(m.num_layers, lines)))]
        label_w = max(len(label) for label, _, _ in rows) + 1
        shares = m.shares(self.logical, width - label_w)
        text = Text()
        for label, layers, heads in rows:
            text.append(label.ljust(label_w), style="dim")
            for share in shares[np.ix_(layers, heads)].mean(axis=(0, 1)):
                text.append(" ", style=Style(bgcolor=colour(float(share))))
            text.append("\n")
        axis = f"{self.logical:,}"
        text.append("0".ljust(max(1, width - len(axis))) + axis + "\n", style="dim")
        text.append("■", style=colour(1.0))
        text.append(" kept  ", style="dim")
        text.append("■", style=colour(0.0))
        text.append(" dropped", style="dim")
        return text


def _label(group: np.ndarray) -> str:
    return f"L{group[0]}" if len(group) == 1 else f"L{group[0]}-{group[-1]}"
