"""The KV panel: what the cache holds against what full attention would hold, straight from the engine's KVMetrics."""

from __future__ import annotations

from rich.table import Table
from textual.widgets import Static

from ..engine import KVMetrics
from ..run import human_bytes


def panel_rows(m: KVMetrics) -> list[tuple[str, str]]:
    """(label, value) rows of the panel, so tests read exactly what is shown."""
    ratio = f"{m.logical_tokens / m.retained_tokens:.1f}x" if m.retained_tokens else "–"
    return [
        ("logical", f"{m.logical_tokens:,}"),
        ("retained", f"{m.retained_tokens:,}"),
        ("budget", f"{m.budget:,}" if m.budget is not None else "off"),
        ("ratio", ratio),
        ("KV used", human_bytes(m.kv_bytes)),
        ("KV saved", human_bytes(m.kv_bytes_full - m.kv_bytes)),
        ("rounds", f"{m.rounds:,}"),
        ("peak", f"{m.peak_retained_tokens:,}"),
    ]


class KVPanel(Static):
    DEFAULT_CSS = """
    KVPanel { height: auto; border: round $primary; padding: 0 1; }
    """

    def __init__(self, **kwargs):
        super().__init__("loading…", **kwargs)
        self.metrics: KVMetrics | None = None
        self.border_title = "KV cache"

    def show(self, metrics: KVMetrics) -> None:
        self.metrics = metrics
        table = Table.grid(expand=True)
        table.add_column(style="dim")
        table.add_column(justify="right")
        for label, value in panel_rows(metrics):
            table.add_row(label, value)
        self.update(table)

    def rows(self) -> dict[str, str]:
        return dict(panel_rows(self.metrics)) if self.metrics else {}
