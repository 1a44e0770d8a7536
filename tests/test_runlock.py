"""One writer per run folder (`clipcond.runlock`): a second writer is refused at once, a dead one is taken over."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from clipcond.runlock import LOCK_FILE, RunFolderBusyError, run_folder_lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from clipcond.runlock import run_folder_lock
    with run_folder_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def holder(tmp_path):
    """Another process holding the lock of `tmp_path / "run"` until killed."""
    folder = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield folder, proc
    proc.kill()
    proc.wait()


def test_a_second_writer_in_another_process_is_refused(holder):
    folder, proc = holder
    message = rf"`--output-dir` .*run.* is in use by another run \(pid {proc.pid} "
    with pytest.raises(RunFolderBusyError, match=message), run_folder_lock(folder):
        pass


def test_a_training_into_a_held_folder_stops_before_any_work(holder, shapes_data, capsys):
    from clipcond.cli import main

    folder, proc = holder
    argv = ["train", "clip", "--data", str(shapes_data), "--output-dir", str(folder), "--model", "test"]
    assert main([*argv, "--max-train-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"is in use by another run (pid {proc.pid}" in err[0]
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]  # nothing written


def test_the_lock_of_a_killed_run_is_taken_over(holder, caplog):
    folder, proc = holder
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="clipcond.runlock"), run_folder_lock(folder):
        holder_record = json.loads((folder / LOCK_FILE).read_text())
    assert holder_record["pid"] == os.getpid()
    assert f"taking over {folder / LOCK_FILE} from a run that is gone (pid {proc.pid} " in caplog.text


def test_a_clean_exit_leaves_nothing_to_take_over(tmp_path, caplog):
    with run_folder_lock(tmp_path):
        pass
    assert (tmp_path / LOCK_FILE).read_text() == ""
    with (  # one holder at a time, within one process too
        caplog.at_level(logging.WARNING, logger="clipcond.runlock"),
        run_folder_lock(tmp_path),
        pytest.raises(RunFolderBusyError),
        run_folder_lock(tmp_path),
    ):
        pass
    assert "taking over" not in caplog.text


def test_a_second_demo_into_one_folder_is_refused(holder, capsys):
    from clipcond.cli import main

    folder, proc = holder
    assert main(["demo", "--output-dir", str(folder)]) == 2
    assert f"is in use by another run (pid {proc.pid}" in capsys.readouterr().err
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]


def test_a_file_system_without_flock_warns_and_runs(tmp_path, monkeypatch, caplog):
    import errno

    from clipcond import runlock

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="clipcond.runlock"), run_folder_lock(tmp_path):
        pass
    assert "nothing stops a second run from writing into it" in caplog.text
