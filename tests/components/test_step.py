"""``with step(name):``: a user error ends the task with one line and exit status 2; times are recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.step import EVENTS_ENV, step
from toptagger.errors import DataError


def test_a_user_error_is_one_line_and_exit_status_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    monkeypatch.setenv(EVENTS_ENV, str(events))
    with step("fine"):
        pass
    with pytest.raises(SystemExit) as stopped, step("data"):
        raise DataError("jets.h5: no such file")
    assert stopped.value.code == 2
    assert capsys.readouterr().err.strip() == "error: data: jets.h5: no such file"
    records = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(r["step"], r["error"]) for r in records] == [("fine", None), ("data", "jets.h5: no such file")]
    assert all(r["seconds"] >= 0 for r in records)


def test_a_bug_keeps_its_traceback() -> None:
    with pytest.raises(ZeroDivisionError), step("train"):
        _ = 1 / 0
