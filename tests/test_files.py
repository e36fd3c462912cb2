"""Crash-safe output (`vlm_depth.files`): a failed write leaves the old file and no temporary, a torn log line is
dropped but damage elsewhere is refused, and claiming an output folder never deletes what is not a run."""

from __future__ import annotations

import logging
import os

import pytest

from vlm_depth.errors import DataError, RunFolderError
from vlm_depth.files import LOCK_NAME, atomic_path, atomic_write, claim_output, read_jsonl


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write(tmp_path / "summary.json", "old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("crash while writing")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_torn_last_log_line_is_dropped_with_a_warning_and_damage_elsewhere_is_an_error(tmp_path, caplog):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with caplog.at_level(logging.WARNING):
        assert read_jsonl(log) == [{"step": 1}, {"step": 2}]
    assert "torn last line 3" in caplog.text
    log.write_text('{"step": 1}\ngarbage\n{"step": 3}\n')
    with pytest.raises(DataError, match="line 2"):
        read_jsonl(log)


def test_claiming_keeps_foreign_files_releases_the_lock_and_never_empties_the_working_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with claim_output(out, "complete", ["summary.json"], overwrite=True):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (out / "notes.txt").is_file() and not (out / LOCK_NAME).exists()

    (out / "summary.json").write_text("{}")
    cwd = os.getcwd()
    os.chdir(out)
    try:
        with (
            pytest.raises(RunFolderError, match="working directory|holds"),
            claim_output(out, "complete", ["summary.json"], overwrite=True),
        ):
            pass
    finally:
        os.chdir(cwd)
    assert (out / "notes.txt").is_file() and (out / "summary.json").is_file()
