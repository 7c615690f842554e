"""Run directories: overwrite=true replaces earlier runs only, never a user's files."""

from __future__ import annotations

from pathlib import Path

import pytest

from dialogrl.outputs import check_output_dir, replace_dir
from dialogrl.types import DialogRLError


def test_only_earlier_runs_are_replaced(tmp_path: Path) -> None:
    check_output_dir(tmp_path / "new", overwrite=False)  # nothing there: fine either way
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty", overwrite=False)  # nothing in it to lose
    (tmp_path / "empty" / "run.json").write_text("{}")
    with pytest.raises(DialogRLError, match="already exists .set overwrite=true"):
        check_output_dir(tmp_path / "empty", overwrite=False)
    check_output_dir(tmp_path / "empty", overwrite=True)
    (tmp_path / "empty" / "run.json").unlink()

    notes = tmp_path / "notes.yaml"
    notes.write_text("mine")
    with pytest.raises(DialogRLError, match=r"notes.yaml is not a directory.*nothing was deleted"):
        check_output_dir(notes, overwrite=True)
    with pytest.raises(DialogRLError, match=r"^out .*notes.yaml/run/sub: .*notes.yaml is not a directory$"):
        check_output_dir(notes / "run" / "sub", overwrite=False, key="out")  # was "File exists" from mkdir, later
    folder = tmp_path / "precious"
    folder.mkdir()
    (folder / "data.jsonl").write_text("{}")
    with pytest.raises(DialogRLError, match=r"precious is not a run directory \(no run.json\)"):
        check_output_dir(folder, overwrite=True)
    (folder / "run.json").write_text("{}")  # now it is an earlier run: replaceable, unless an input lives there
    with pytest.raises(DialogRLError, match=r"holds the input .*data.jsonl"):
        check_output_dir(folder, overwrite=True, inputs=[None, folder / "data.jsonl"])
    check_output_dir(folder, overwrite=True, inputs=[notes])

    new = tmp_path / ".new.tmp"
    new.mkdir()
    (new / "run.json").write_text('{"new": true}')
    replace_dir(new, folder, overwrite=True)
    assert (folder / "run.json").read_text() == '{"new": true}' and not (folder / "data.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "notes.yaml", "precious"]  # nothing left over
    assert notes.read_text() == "mine"


def test_files_are_written_whole_with_ordinary_permissions(tmp_path: Path) -> None:
    import os
    import stat

    from dialogrl.outputs import write_text_atomic

    umask = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "sub" / "logs.jsonl", "{}\n")
    finally:
        os.umask(umask)
    assert path.read_text() == "{}\n" and stat.S_IMODE(path.stat().st_mode) == 0o644
    (tmp_path / "a_dir").mkdir()
    with pytest.raises(OSError) as info:  # the message names the user's path, not the temporary file
        write_text_atomic(tmp_path / "a_dir", "x")
    assert info.value.filename == str(tmp_path / "a_dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "sub"]
