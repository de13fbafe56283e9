"""Run directories: which directories a command may use, and what --overwrite may delete."""

import json
import os

import pytest

from rnip_ext import rundir
from rnip_ext.rundir import MANIFEST, OutputDirError


def make_run(path, kind, files=("config.json", "last.pt")):
    rundir.claim(str(path), kind, rundir.check(str(path), kind))
    for name in files:
        rundir.record(str(path), name)
        (path / name).write_text(name)


def test_new_and_empty_directories_are_usable(tmp_path):
    assert rundir.check(str(tmp_path / "absent"), "train") == "new"
    (tmp_path / "empty").mkdir()
    assert rundir.check(str(tmp_path / "empty"), "train") == "new"
    assert rundir.claim(str(tmp_path / "absent"), "train", "new") is True
    assert json.loads((tmp_path / "absent" / MANIFEST).read_text())["kind"] == "train"
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match="exists and is not a directory"):
        rundir.check(str(tmp_path / "file"), "train")


def test_foreign_contents_are_refused_and_named(tmp_path):
    (tmp_path / "a.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    for flags in ({}, {"overwrite": True}, {"replace_own": True}, {"resume": True}):
        with pytest.raises(OutputDirError, match=r"a\.txt, sub") as info:
            rundir.check(str(tmp_path), "train", **flags)
        assert str(tmp_path) in str(info.value)
    assert (tmp_path / "a.txt").read_text() == "mine"


def test_own_kind_needs_resume_or_overwrite_and_other_kinds_are_refused(tmp_path):
    run = tmp_path / "run"
    make_run(run, "train")
    with pytest.raises(OutputDirError, match="already holds a train run; pass --resume"):
        rundir.check(str(run), "train", hint="pass --resume")
    assert rundir.check(str(run), "train", resume=True) == "resume"
    with pytest.raises(OutputDirError, match="holds a train run"):
        rundir.check(str(run), "prune")
    with pytest.raises(OutputDirError, match="holds no prune run"):
        rundir.check(str(run), "prune", resume=True)
    assert rundir.check(str(run), "prune", overwrite=True) == "replace"


def test_replace_deletes_only_recorded_files_and_sub_runs(tmp_path):
    demo = tmp_path / "demo"
    make_run(demo, "demo", files=("report.md",))
    rundir.record(str(demo), "train-rni")
    make_run(demo / "train-rni", "train")
    (demo / "train-rni" / "last.pt.tmp").write_text("torn")  # owned through last.pt
    assert rundir.check(str(demo), "demo", replace_own=True) == "replace"
    rundir.claim(str(demo), "demo", "replace")
    assert os.listdir(demo) == [MANIFEST]
    # A stray file anywhere blocks the replacement, and nothing is deleted.
    rundir.record(str(demo), "train-l1")
    make_run(demo / "train-l1", "train")
    (demo / "train-l1" / "notes.txt").write_text("mine")
    with pytest.raises(OutputDirError, match=r"train-l1/notes\.txt"):
        rundir.check(str(demo), "demo", replace_own=True)
    assert sorted(os.listdir(demo / "train-l1")) == sorted([MANIFEST, "config.json", "last.pt", "notes.txt"])


def test_current_directory_and_its_parents_are_never_cleared(tmp_path, monkeypatch):
    run = tmp_path / "run"
    make_run(run, "demo")
    monkeypatch.chdir(run)
    with pytest.raises(OutputDirError, match="current directory"):
        rundir.check(".", "demo", overwrite=True)
    with pytest.raises(OutputDirError, match="current directory or one of its parents"):
        rundir.check(str(tmp_path), "demo", overwrite=True)
    assert sorted(os.listdir(run)) == sorted([MANIFEST, "config.json", "last.pt"])


def test_release_removes_only_a_useless_directory_this_command_created(tmp_path):
    run = tmp_path / "run"
    make_run(run, "train", files=("config.json",))
    assert rundir.release(str(run), created=False) is False and run.exists()
    assert rundir.release(str(run), created=True) is True and not run.exists()
    make_run(run, "train", files=("config.json", "last.pt"))
    assert rundir.release(str(run), created=True) is False and (run / "last.pt").exists()


def test_runs_from_before_manifests_can_be_resumed_but_not_overwritten(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"arch": "vgg16"}))
    (run / "last.pt").write_bytes(b"x")
    assert rundir.check(str(run), "train", resume=True) == "resume"
    with pytest.raises(OutputDirError, match="did not record writing"):
        rundir.check(str(run), "train", overwrite=True)
    rundir.claim(str(run), "train", "resume")  # from now on, its files are recorded
    assert set(json.loads((run / MANIFEST).read_text())["files"]) == {"config.json", "last.pt"}


def test_resuming_an_old_run_never_credits_the_users_own_files(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text("{}")
    (run / "last.pt").write_bytes(b"x")
    (run / "notes.txt").write_text("mine")
    rundir.claim(str(run), "train", rundir.check(str(run), "train", resume=True))
    assert set(json.loads((run / MANIFEST).read_text())["files"]) == {"config.json", "last.pt"}
    with pytest.raises(OutputDirError, match="notes.txt"):
        rundir.check(str(run), "train", overwrite=True)
    assert (run / "notes.txt").read_text() == "mine"


def test_output_that_is_or_contains_an_input_run_is_refused(tmp_path):
    run = tmp_path / "runs" / "a"
    make_run(run, "train")
    for out in (run, tmp_path / "runs", tmp_path):
        with pytest.raises(OutputDirError, match="input run"):
            rundir.refuse_overlap(str(out), [str(run)])
    rundir.refuse_overlap(str(tmp_path / "runs" / "b"), [str(run)])  # a sibling is fine
    rundir.refuse_overlap(str(run / "pruned"), [str(run)])  # a new folder inside the run too


def test_resume_hint_drops_overwrite():
    from rnip_ext.cli import resume_command

    assert resume_command(["train", "--out", "r", "--overwrite"]) == "rnip train --out r --resume"
    assert resume_command(["prune", "a", "--out", "b", "--resume"]) == "rnip prune a --out b --resume"
