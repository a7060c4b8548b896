"""Nothing the user owns is deleted or overwritten: runs are recognisable, cleanup is by exact name, outputs
never replace an input or an existing file, runs and data stay apart, damaged runs recover with a message."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import write_config, write_images
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.errors import RunError
from ddpm_tf.images import read_png_metadata
from ddpm_tf.runs import MARKER_NAME, RunDir, RunLock, describe_runs

FIXTURE = Path(__file__).parent / "fixtures" / "export-keras3"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def snapshot(folder: Path) -> dict:
    """{relative path: bytes or 'dir'} of everything under a folder."""
    return {str(p.relative_to(folder)): ("dir" if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def user_folder(path: Path) -> Path:
    """A person's folder with names that look like temporaries and like a run's parts."""
    (path / "photos_temp").mkdir(parents=True)
    (path / "photos_temp" / "p1.jpg").write_bytes(b"a photo")
    (path / "budget_temp.xlsx").write_bytes(b"a budget")
    (path / ".notes.txt.tmp-1").write_bytes(b"notes")
    for sub in ("checkpoints", "exports", "previews", "tensorboard", "eval"):
        (path / sub).mkdir()
        (path / sub / "mine.txt").write_bytes(b"mine")
    (path / "exports" / "ema-00000001.npz").write_bytes(b"my own file of that name")
    (path / "metrics.csv").write_bytes(b"my,own\n1,2\n")
    (path / "eval.csv").write_bytes(b"my,eval\n")
    return path


@pytest.fixture
def images(tmp_path):
    write_images(tmp_path / "images", 6)
    return tmp_path / "images"


@pytest.mark.parametrize("restart", [False, True])
@pytest.mark.parametrize("data_ok", [True, False])
def test_a_folder_that_is_not_a_run_is_refused_untouched(tmp_path, images, restart, data_ok):
    folder = user_folder(tmp_path / "U")
    before = snapshot(folder)
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(folder)},
                                             "data": {"dir": str(images if data_ok else tmp_path / "missing")}})
    result = invoke("train", "--config", cfg, *(["--restart"] if restart else []))
    assert result.exit_code == 1, result.output
    assert "is not a ddpm_tf run" in result.output and str(folder) in result.output
    assert "Traceback" not in result.output
    assert snapshot(folder) == before


def test_the_sweep_and_restart_touch_only_this_tools_names(tmp_path):
    run = RunDir(tmp_path / "run")
    run.claim()
    assert run.marker.is_file() and run.is_run()
    ours = [run.config_path, run.metrics_csv, run.eval_csv, run.progress_path, run.written_by,
            run.checkpoints / "checkpoint", run.checkpoints / "ckpt-5.index",
            run.checkpoints / "ckpt-5.data-00000-of-00001", run.export_path(5), run.previews / "latest.png",
            run.previews / "preview-epoch00001-step00000005.png",
            run.eval_dir / "samples-step5-ddim-n4.png", run.eval_dir / "memorization-step5.csv",
            run.tensorboard / "events.out.tfevents.1.host.2.v2"]
    partial = [run.exports / ".ema-00000009.npz.tmp-999999999", run.path / ".config.yaml.tmp-999999999",
               run.samples / "00001-grid-x" / ".0000-seed1.png.tmp-999999999",
               run.checkpoints / ("checkpoint.tmp" + "ab" * 16)]
    live = run.samples / ".00002-grid.png.tmp-{}".format(os.getpid())  # a `ddpm sample` writing right now
    theirs = [run.path / "budget_temp.xlsx", run.path / ".notes.tmp-1", run.exports / "ema-final.npz",
              run.exports / ".backup.npz.tmp-999999999", run.checkpoints / "ckpt-3_temp_mine" / "keep.txt",
              run.previews / "my-preview.png", run.samples / "00001-grid-x.png", run.samples / "00001-grid-x" / "a.png",
              run.tensorboard / "notes.txt"]
    for p in ours + partial + theirs + [live]:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")
    tf_temp = run.checkpoints / "ckpt-9_temp"
    tf_temp.mkdir()
    (tf_temp / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    partial += [tf_temp / "part-00000-of-00001.data-00000-of-00001", tf_temp]

    removed = run.remove_partial_files()
    assert sorted(removed) == sorted(partial)
    assert all(p.exists() for p in ours + theirs + [live])

    removed = run.remove_written()  # what --restart deletes
    assert sorted(removed) == sorted(ours)
    assert all(p.exists() for p in theirs + [live]) and run.marker.exists()
    assert not run.eval_dir.exists()  # a folder left empty goes too; one with other files stays
    assert run.exports.is_dir() and run.samples.is_dir()


def test_a_partial_file_sweep_outside_a_run_removes_nothing(tmp_path):
    folder = user_folder(tmp_path / "U")
    (folder / "exports" / ".ema-00000001.npz.tmp-999999999").write_bytes(b"x")
    before = snapshot(folder)
    run = RunDir(folder)
    assert not run.is_run() and run.remove_partial_files() == []
    with pytest.raises(RunError, match="not a ddpm_tf run"):
        run.remove_written()
    assert snapshot(folder) == before


def test_runs_made_before_the_marker_are_still_runs(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "old")
    run = RunDir(tmp_path / "old")
    assert not run.marker.exists() and run.is_run()
    run.claim()
    assert run.marker.exists()
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake" / "config.yaml").write_text("run: {dir: x}\n", encoding="utf-8")  # a person's own config
    assert not RunDir(tmp_path / "fake").is_run()


@pytest.mark.parametrize("layout", ["run-in-data", "data-in-run", "same"])
def test_run_and_data_folders_are_kept_apart(tmp_path, images, layout):
    run_dir = {"run-in-data": images / "run", "data-in-run": images.parent, "same": images}[layout]
    before = snapshot(tmp_path)
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(run_dir)}, "data": {"dir": str(images)}})
    before = snapshot(images)
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 2, result.output
    assert f"run.dir {run_dir}" in result.output and f"data.dir {images}" in result.output
    assert snapshot(images) == before and not (images / "run").exists()


@pytest.fixture
def run_dir(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    return tmp_path / "run"


def test_sample_outputs_are_numbered_and_never_replace_a_file(run_dir, tmp_path):
    for _ in range(2):
        result = invoke("sample", "--run", run_dir, "--n", 2, "--sampler", "ddim", "--steps", 2)
        assert result.exit_code == 0, result.output
    grids = sorted(p.name for p in (run_dir / "samples").glob("*.png"))
    assert [g[:6] for g in grids] == ["00001-", "00002-"] and grids[0][6:] == grids[1][6:]
    assert sorted(p.name for p in (run_dir / "samples" / grids[1][:-4]).iterdir()) == ["0000-seed0.png",
                                                                                         "0001-seed1.png"]
    mine = tmp_path / "existing.png"
    mine.write_bytes(b"my picture")
    result = invoke("sample", "--run", run_dir, "--n", 2, "--sampler", "ddim", "--steps", 2, "--out", mine)
    assert result.exit_code == 1 and "exists; pass --overwrite" in result.output
    assert "sampling" not in result.output  # refused before the work
    assert mine.read_bytes() == b"my picture"
    result = invoke("sample", "--run", run_dir, "--n", 2, "--sampler", "ddim", "--steps", 2, "--out", mine,
                    "--overwrite")
    assert result.exit_code == 0, result.output
    assert read_png_metadata(mine)["ddpm_tf:seeds"] == "0,1"


def test_a_single_image_beside_an_explicit_grid_is_not_replaced(run_dir, tmp_path):
    (tmp_path / "faces").mkdir()
    (tmp_path / "faces" / "0001-seed1.png").write_bytes(b"mine")
    result = invoke("sample", "--run", run_dir, "--n", 2, "--sampler", "ddim", "--steps", 2,
                    "--out", tmp_path / "faces.png")
    assert result.exit_code == 1 and "faces/0001-seed1.png exists" in result.output
    assert (tmp_path / "faces" / "0001-seed1.png").read_bytes() == b"mine" and not (tmp_path / "faces.png").exists()


@pytest.mark.parametrize("bad, message", [
    ("afile/grid.png", "is a file, not a folder"),
    ("grid", "expected a .png file name"),
    ("grid.jpg", "expected a .png file name"),
    ("folder.png", "is a directory"),  # Click's own check of --out
])
def test_bad_output_paths_are_refused_before_sampling(run_dir, tmp_path, bad, message):
    (tmp_path / "afile").write_bytes(b"x")
    (tmp_path / "folder.png").mkdir()
    for command in (["sample", "--n", 2], ["interpolate", "--seeds", 1, 2, "--frames", 2]):
        result = invoke(*command, "--run", run_dir, "--steps", 2, "--out", tmp_path / bad)
        assert result.exit_code in (1, 2), result.output
        assert message in result.output and "Traceback" not in result.output
        assert "sampling" not in result.output and "interpolating" not in result.output


def test_default_outputs_in_an_unwritable_place_are_one_line(run_dir):
    (run_dir / "samples").write_bytes(b"a file where the samples folder goes")
    result = invoke("sample", "--run", run_dir, "--n", 2, "--steps", 2)
    assert result.exit_code == 1 and "is a file, not a folder" in result.output and "sampling" not in result.output


@pytest.mark.parametrize("out", ["same", "link", "pair"])
def test_img2img_never_replaces_its_input(run_dir, tmp_path, out):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(photo)
    before = photo.read_bytes()
    target = {"same": photo, "link": tmp_path / "link.png", "pair": tmp_path / "photo"}[out]
    if out == "link":
        target.symlink_to(photo)
    if out == "pair":  # the before/after pair of --out photo would be photo-pair.png: make that the input
        photo = photo.rename(tmp_path / "photo-pair.png")
        target = tmp_path / "photo.png"
    result = invoke("img2img", photo, "--run", run_dir, "--steps", 2, "--out", target, "--overwrite")
    assert result.exit_code == 1 and "is an input of this command" in result.output, result.output
    assert photo.read_bytes() == before


def test_img2img_and_interpolate_defaults_are_numbered(run_dir, tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 20, 3), 90, np.uint8)).save(photo)
    for _ in range(2):
        assert invoke("img2img", photo, "--run", run_dir, "--steps", 2).exit_code == 0
        assert invoke("interpolate", "--run", run_dir, "--seeds", 1, 2, "--frames", 2, "--steps", 2).exit_code == 0
    names = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert [n[:5] for n in names] == ["00001", "00001", "00002", "00002", "00003", "00003", "00004", "00004"]
    assert sum(n.endswith("-pair.png") for n in names) == 2 and sum(n.endswith(".gif") for n in names) == 2


def test_a_damaged_export_names_the_file_and_the_others(run_dir):
    exports = sorted((run_dir / "exports").glob("ema-*.npz"))
    good = exports[-1]
    shutil.copy(good, run_dir / "exports" / "ema-00000001.npz")
    damaged = run_dir / "exports" / "ema-00099999.npz"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    result = invoke("sample", "--run", run_dir, "--n", 1, "--steps", 2)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert str(damaged) in result.output and "truncated or damaged" in result.output
    assert "--checkpoint 1" in result.output


@pytest.mark.parametrize("content", [b"", b"\x00\xff garbage", b"pid: [1, 2]\n", b"- a list\n"])
def test_an_empty_or_garbage_lock_is_taken_over_with_a_note(tmp_path, content):
    run = RunDir(tmp_path / "run")
    run.claim()
    run.lock_path.write_bytes(content)
    lock = RunLock(run)
    note = lock.acquire()
    assert note and "empty or unreadable lock" in note
    assert yaml.safe_load(run.lock_path.read_text(encoding="utf-8"))["pid"] == os.getpid()
    lock.release()


def test_runs_lists_training_only_for_a_live_trainer_and_survives_damaged_files(tmp_path):
    root = tmp_path / "runs"
    for name in ("live", "dead", "garbage"):
        shutil.copytree(FIXTURE, root / name)
    host = socket.gethostname()
    (root / "live" / ".lock").write_text(f"pid: {os.getpid()}\nhost: {host}\n", encoding="utf-8")
    (root / "dead" / ".lock").write_text(f"pid: 999999999\nhost: {host}\n", encoding="utf-8")
    (root / "garbage" / ".lock").write_bytes(b"\xff\xfe")
    (root / "garbage" / "metrics.csv").write_bytes(b"\xff\xfe\x00 not a csv \x00")
    rows = {Path(r["run"]).name: r for r in describe_runs(root)}
    assert rows["live"]["training"] and not rows["dead"]["training"] and not rows["garbage"]["training"]
    result = invoke("runs", "--runs-root", root)
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines()[1:]}
    assert f"training (pid {os.getpid()}" in lines[str(root / "live")] and "(pid" not in lines[str(root / "dead")]


def test_an_unwritable_run_dir_is_one_line(tmp_path, images):
    (tmp_path / "afile").write_bytes(b"x")
    cfg = write_config(tmp_path / "c.yaml", {"run": {"dir": str(tmp_path / "afile" / "run")},
                                             "data": {"dir": str(images)}})
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 1 and "cannot create the run there" in result.output and "Traceback" not in result.output


def test_marker_is_written_with_the_run(tiny_project):
    cfg, run_dir = tiny_project
    result = invoke("train", "--config", cfg, "--set", "train.epochs=1")
    assert result.exit_code == 0, result.output
    assert (run_dir / MARKER_NAME).is_file() and RunDir(run_dir).is_run()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run trained 2 epochs with a checkpoint each (steps 2 and 4), its config and images."""
    root = tmp_path_factory.mktemp("trained")
    write_images(root / "images", 6)
    cfg = write_config(root / "c.yaml", {"run": {"dir": str(root / "run"), "preview_every": 0},
                                         "data": {"dir": str(root / "images")}})
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    return root


def copy_of(trained: Path, tmp_path: Path, epochs: int):
    """(config, RunDir) of a copy of the trained project, its config asking for `epochs` epochs."""
    shutil.copytree(trained, tmp_path / "p", symlinks=True)
    cfg = write_config(tmp_path / "p" / "c.yaml", {"run": {"dir": str(tmp_path / "p" / "run"), "preview_every": 0},
                                                   "data": {"dir": str(tmp_path / "p" / "images")},
                                                   "train": {"epochs": epochs}})
    return cfg, RunDir(tmp_path / "p" / "run")


def damage(run: RunDir, how: str) -> None:
    data, index = run.checkpoints / "ckpt-4.data-00000-of-00001", run.checkpoints / "ckpt-4.index"
    if how == "truncated-data":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif how == "missing-data":
        data.unlink()
    elif how == "truncated-index":
        index.write_bytes(index.read_bytes()[: index.stat().st_size // 3])
    elif how == "garbage-state":
        (run.checkpoints / "checkpoint").write_bytes(b"\x00\xff not a checkpoint state \x00")
        data.unlink()


@pytest.mark.parametrize("how", ["truncated-data", "missing-data", "truncated-index", "garbage-state"])
def test_resume_skips_a_damaged_newest_checkpoint(trained, tmp_path, how):
    cfg, run = copy_of(trained, tmp_path, epochs=3)
    damage(run, how)
    result = CliRunner().invoke(main, ["train", "--config", str(cfg)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "skipped the damaged checkpoint ckpt-4" in result.output and "resuming" in result.output
    assert "from step 2 " in result.output
    assert max(run.export_paths()) == 6


def test_no_loadable_checkpoint_says_how_to_start_over(trained, tmp_path):
    cfg, run = copy_of(trained, tmp_path, epochs=3)
    for p in run.checkpoints.glob("ckpt-*.data-*"):
        p.write_bytes(b"")
    before = snapshot(run.checkpoints)
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 1 and "no checkpoint loads" in result.output and "--restart" in result.output
    assert "Traceback" not in result.output and snapshot(run.checkpoints) == before


def test_a_garbage_written_by_warns_and_resumes(trained, tmp_path):
    cfg, run = copy_of(trained, tmp_path, epochs=3)
    run.written_by.write_bytes(b"\xff\x00: [")
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 0, result.output
    assert "written_by.yaml is unreadable" in result.output and "from step 4" in result.output


def test_restart_removes_everything_the_run_wrote_but_samples(trained, tmp_path):
    cfg, run = copy_of(trained, tmp_path, epochs=1)
    run.eval_csv.write_text("step,kid\n4,0.1\n", encoding="utf-8")
    (run.eval_dir).mkdir()
    (run.eval_dir / "samples-step4-x-n4.png").write_bytes(b"x")
    (run.samples / "00001-grid").mkdir(parents=True)
    (run.samples / "00001-grid.png").write_bytes(b"kept")
    result = invoke("train", "--config", cfg, "--restart")
    assert result.exit_code == 0, result.output
    assert not run.eval_csv.exists() and not run.eval_dir.exists()
    assert sorted(run.export_paths()) == [2] and (run.samples / "00001-grid.png").read_bytes() == b"kept"
    with open(run.metrics_csv, encoding="utf-8") as f:
        assert len(f.read().splitlines()) == 2  # the header and the one new epoch


def test_a_resume_across_keras_lines_is_refused_untouched(trained, tmp_path):
    from ddpm_tf import compat

    cfg, run = copy_of(trained, tmp_path, epochs=3)
    other = "2.10.0" if compat.KERAS3 else "3.15.0"
    run.written_by.write_text(f"tf: x\nkeras: {other}\n", encoding="utf-8")
    before = snapshot(run.path)
    result = invoke("train", "--config", cfg)
    assert result.exit_code == 1 and f"written by Keras {other}" in result.output and "--restart" in result.output
    assert snapshot(run.path) == before


def test_runs_lists_step_epoch_and_loss(trained):
    result = invoke("runs", "--runs-root", trained)
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()
    assert header.split()[:4] == ["run", "step", "epoch", "loss"]
    cells = row.split()
    assert cells[0] == str(trained / "run") and cells[1:3] == ["4", "2"] and float(cells[3]) > 0
