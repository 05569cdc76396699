"""The fidelity table's files: accuracy with Wilson intervals, and the teacher-forcing table when it was measured."""

import json

from triattn_local.eval import Cell, EvalConfig, markdown_table, write_results


def cell(method, budget, correct, forced=0, errors=0):
    return Cell(method, budget, 200, correct, 100.0, 1e5, 2700.0, 1.0, forced, errors)


def test_teacher_forcing_table_and_json(tmp_path):
    cells = [cell("full", None, 200, 5000, 10), cell("triattention", 128, 0, 5000, 1200),
             cell("snapkv", 128, 3, 5000, 900)]
    cfg = EvalConfig(teacher_forcing=True)
    text = markdown_table(cells, cfg, "triattn eval --teacher-forcing")
    assert "| triattention | 0.0% [0–2] |" in text
    assert "| triattention | 24.00% |" in text and "| snapkv | 18.00% |" in text
    assert "Full attention: 0.20% of 5000 tokens" in text
    write_results(cells, cfg, tmp_path, "cmd")
    data = json.loads((tmp_path / "fidelity.json").read_text())
    assert [c.get("token_error_rate") for c in data["cells"]] == [0.002, 0.24, 0.18]
    assert data["config"]["teacher_forcing"] is True


def test_no_teacher_forcing_table_when_not_measured():
    text = markdown_table([cell("full", None, 200), cell("triattention", 128, 0)], EvalConfig(), "triattn eval")
    assert "teacher forcing" not in text and "| triattention | 0.0% [0–2] |" in text
