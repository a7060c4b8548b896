"""The web page's functions without a browser (ddpm_tf/ui/): runs listing, metrics, previews and eval reading,
generation with runs kept loaded, uploads through prepare's guards, prepare's report, the trainer as a real
`ddpm train` process (start, lock, SIGTERM stop), path checks, --listen without a password refused, and a
password asked for when one is set."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import ui_project
from PIL import Image

from ddpm_tf.cli import main
from ddpm_tf.errors import ConfigError, DataError, LabelError, PathError, RunError
from ddpm_tf.images import read_png_metadata
from ddpm_tf.runs import RunDir, RunLock, append_csv_row
from ddpm_tf.ui import browse, dataset
from ddpm_tf.ui.access import access
from ddpm_tf.ui.roots import Roots
from ddpm_tf.ui.studio import Studio, conditions, label_choices, seed_of
from ddpm_tf.ui.trainer import Trainers, parse_overrides


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """One tiny labelled run trained for 2 epochs (4 steps), shared by the module."""
    return ui_project(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def roots(project):
    return Roots(project["runs"], project["configs"])


def wait_for(condition, what: str, timeout: float = 400.0):
    """Poll `condition` until it returns something true (a stuck trainer fails the test, with `what`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"gave up waiting for {what}")


def test_runs_listing_metrics_previews_eval_and_config(project, roots, tmp_path):
    run = project["run"]
    empty = project["runs"] / "young"  # a run without exports yet: listed after the one with a checkpoint
    empty.mkdir(exist_ok=True)
    shutil.copy(run / "config.yaml", empty / "config.yaml")
    try:
        rows = browse.list_runs(roots.runs)
        assert [r["name"] for r in rows] == ["tiny", "young"]
        table = browse.runs_table(roots.runs)
        assert len(table[0]) == len(browse.RUN_COLUMNS) and table[0][:3] == ["tiny", 4, "2"]
        assert table[1][1] == "-" and table[0][5] == ""  # no step yet; not training
    finally:
        shutil.rmtree(empty)
    assert browse.checkpoints(run) == [4, 2]
    curves = browse.metrics_curves(run)
    assert [s for s, _ in curves["loss"]] == [2, 4] and all(v > 0 for _, v in curves["loss"])
    assert [s for s, _ in curves["learning_rate"]] == [2, 4]
    history = browse.previews(run)
    assert [s for s, _ in history] == [2, 4] and all(p.is_file() for _, p in history)
    assert browse.latest_preview(run) == RunDir(run).previews / "latest.png"
    assert "image_size: 16" in browse.config_text(run)
    assert browse.eval_table(run) == ([], []) and browse.kid_curve(run) == []
    eval_csv = RunDir(run).eval_csv
    try:
        for step, kid in ((4, "0.05"), (2, "0.09"), (3, "nan")):
            append_csv_row(eval_csv, {"step": step, "kid_mean": kid, "fid": "12.5"})
        header, rows = browse.eval_table(run)
        assert header == ["step", "kid_mean", "fid"] and len(rows) == 3
        assert browse.kid_curve(run) == [(2, 0.09), (4, 0.05)]  # by step, the NaN left out
    finally:
        eval_csv.unlink()


def test_paths_outside_the_roots_are_refused(project, roots, tmp_path):
    run = project["run"]
    assert roots.check(run / "config.yaml") == (run / "config.yaml").resolve()
    assert roots.check(project["images"] / "dark" / "0.png").is_file()  # a data folder of a run
    assert roots.run("tiny") == run.resolve()
    outside = tmp_path / "secret.txt"
    outside.write_text("secret", encoding="utf-8")
    for bad, says in [(outside, "outside the folders"), ("/etc/passwd", "outside the folders"),
                      (f"{run}/../../secret.txt", "'..' is refused"), ("../etc/passwd", "'..' is refused"),
                      ("", "empty"), (run / "nothing.png", "no such file")]:
        with pytest.raises(PathError, match=says):
            roots.check(bad, "image")
    link_out = project["runs"] / "link-out"
    link_in = project["runs"] / "link-in"
    link_out.symlink_to(outside)
    link_in.symlink_to(run / "config.yaml")
    try:
        with pytest.raises(PathError, match="a link to"):
            roots.check(link_out)
        assert roots.check(link_in) == (run / "config.yaml").resolve()
        with pytest.raises(PathError):
            roots.run("../tiny")
    finally:
        link_out.unlink()
        link_in.unlink()
    assert set(roots.folders()) == {roots.runs, roots.configs, project["images"].resolve()}


def test_generation_keeps_the_run_loaded_and_writes_seed_metadata(project, roots):
    studio = Studio(roots)
    reports = []
    grid, images = studio.generate("tiny", None, seeds_text="5, 9, 11, 2", progress=lambda p, **k: reports.append(p))
    assert [seed_of(p) for p in images] == [5, 9, 11, 2]
    meta = read_png_metadata(images[0])
    assert meta["ddpm_tf:sampler"] == "ddim" and meta["ddpm_tf:steps"] == "5"  # the run's sample section
    for path in images:
        with Image.open(path) as im:
            assert im.size == (16, 16)
    assert reports[-1] == (5, 5)  # the progress bar reached its end: 5 steps of one batch
    assert grid.parent == RunDir(project["run"]).samples
    loaded = studio.loaded("tiny", "")
    _, again = studio.generate("tiny", "4", first_seed=9, n=1, sampler="ddim", steps=5)
    assert studio.loaded("tiny", None) is loaded and len(loaded._samplers) == 1  # one network, one trace
    assert np.abs(np.asarray(Image.open(again[0]), int) - np.asarray(Image.open(images[1]), int)).max() <= 1
    # A run with labels: a class, and one-line errors from conditions.requested.
    assert label_choices(project["run"]) == ("folders", ["bright", "dark"])
    _, dark = studio.generate("tiny", None, first_seed=0, n=2, labels=conditions("dark", "", 3.0, True))
    assert read_png_metadata(dark[0])["ddpm_tf:class"] == "dark"
    with pytest.raises(LabelError, match="ghost"):
        studio.generate("tiny", None, n=1, labels=conditions("ghost", "", 1.0, True))
    with pytest.raises(ConfigError, match="comma-separated integers"):
        studio.generate("tiny", None, seeds_text="1, two")
    strip, gif = studio.interpolate("tiny", None, 3, 4, frames=3, steps=2)
    assert strip.is_file() and gif.is_file()


def test_uploads_pass_prepares_guards(project, roots, tmp_path):
    studio = Studio(roots)
    photo = tmp_path / "photo.png"
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(photo)
    result, pair = studio.img2img("tiny", None, photo, source_name="photo.png", strength=0.4, steps=5)
    with Image.open(result) as im:
        assert im.size == (16, 16)
    assert pair.is_file() and read_png_metadata(result)["ddpm_tf:source"] == "photo.png"
    text = tmp_path / "notes.png"
    text.write_text("not an image", encoding="utf-8")
    bomb = tmp_path / "big.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(bomb)  # 4096 pixels > this run's data.max_pixels
    for upload, reason in [(text, "not-an-image"), (bomb, "decompression-bomb")]:
        with pytest.raises(DataError, match=f"cannot use this image: {reason}"):
            studio.img2img("tiny", None, upload, source_name=upload.name)


def test_prepare_report_counts_skips_thumbnails_and_balance(project, roots):
    folder = project["images"] / "dark"
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    shutil.copy(folder / "0.png", folder / "copy.png")
    try:
        assert dataset.data_sources(roots) == ["tiny.yaml", "run: tiny"]
        report = dataset.prepare_report(roots, "tiny.yaml")
        counts = dict(map(tuple, report.counts))
        assert counts["used"] == 8 and counts["duplicate"] == 1 and counts["truncated-or-corrupt"] == 1
        assert sorted(row[:2] for row in report.skipped) == [["dark/broken.png", "truncated-or-corrupt"],
                                                            ["dark/copy.png", "duplicate"]]
        assert len(report.thumbnails) == 8 and report.thumbnails[0].shape == (16, 16, 3)
        assert "bright" in report.balance and "dark" in report.balance
        # One class folder as data.dir: its images are unlabelled, which data.labels: folders refuses; the
        # report says so in the page instead of a traceback.
        only_dark = dataset.prepare_report(roots, "run: tiny", str(folder))
        assert only_dark.counts == [] and "error: " in only_dark.summary, only_dark.summary
    finally:
        (folder / "broken.png").unlink()
        (folder / "copy.png").unlink()
    with pytest.raises(PathError, match="outside"):
        dataset.prepare_report(roots, "tiny.yaml", "/etc")


def test_trainer_process_lock_and_sigterm_stop(project, tmp_path):
    roots = Roots(tmp_path / "runs", project["configs"])
    trainers = Trainers(roots)
    with pytest.raises(ConfigError, match="SECTION.KEY=VALUE"):
        trainers.start("tiny.yaml", "long", "epochs=5")
    with pytest.raises(ConfigError, match="train.epochs"):
        trainers.start("tiny.yaml", "long", "train.epochs=-1")
    with pytest.raises(PathError):
        trainers.start("../tiny.yaml", "long")
    with pytest.raises(ConfigError, match="run name"):
        trainers.start("tiny.yaml", "a/b")
    assert parse_overrides("# note\ntrain.epochs=500\n\nrun.preview_every=100") == ["train.epochs=500",
                                                                                    "run.preview_every=100"]
    status = trainers.start("tiny.yaml", "long", "train.epochs=500\nrun.preview_every=100\nrun.checkpoint_every=100")
    process = trainers.processes[roots.runs / "long"]
    try:
        assert status["training"] and status["pid"] == process.pid
        assert os.getsid(process.pid) != os.getsid(0)  # its own session: Ctrl-C on the page does not reach it
        assert RunLock(RunDir(roots.runs / "long")).live_owner()["pid"] == process.pid
        with pytest.raises(RunError, match=f"is being trained by process {process.pid}"):
            trainers.start("tiny.yaml", "long")
        progress = wait_for(lambda: (trainers.status("long")["progress"] or {}).get("step", 0) >= 2 and
                            trainers.status("long")["progress"], "the trainer's progress.json")
        assert progress["total_steps"] == 1000 and progress["status"] == "training"
        assert "training (process" in trainers.status("long")["text"]
        assert "SIGTERM" in trainers.stop("long")
        assert process.wait(timeout=300) == 128 + signal.SIGTERM
    finally:
        if process.poll() is None:
            process.kill()
    status = trainers.status("long")
    assert not status["training"] and status["progress"]["status"] == "stopped"
    assert "not training" in status["text"] and "(stopped)" in status["text"]
    assert RunDir(roots.runs / "long").export_paths()  # the checkpoint saved on SIGTERM: it resumes
    assert "stopped by SIGTERM" in status["log"]
    with pytest.raises(RunError, match="not being trained"):
        trainers.stop("long")


def test_listen_without_a_password_is_refused(tmp_path):
    assert access(None, None, None) == ("127.0.0.1", None)
    assert access("::1", None, None) == ("::1", None)
    assert access("0.0.0.0", "ann:pw", None) == ("0.0.0.0", ("ann", "pw"))
    secret = tmp_path / "pw"
    secret.write_text("\nbob:s3:cr3t\n", encoding="utf-8")
    assert access("192.168.1.5", None, secret) == ("192.168.1.5", ("bob", "s3:cr3t"))
    for args, says in [(["--listen", "0.0.0.0"], "add --auth USER:PASSWORD"),
                       (["--listen", "0.0.0.0", "--auth", "nopassword"], "expected USER:PASSWORD"),
                       (["--auth-file", str(tmp_path / "missing")], "cannot read it")]:
        result = CliRunner().invoke(main, ["ui", *args])
        assert result.exit_code == 2, result.output
        assert says in result.output and len(result.output.strip().splitlines()) == 1


def test_the_page_builds_and_its_handlers_read_the_run(project, roots):
    pytest.importorskip("gradio")
    from ddpm_tf.ui.app import Page, build

    blocks = build(roots)
    # Sampling, img2img, interpolation and prepare share one queue slot: a second request waits.
    heavy = {fn.name: fn.concurrency_limit for fn in blocks.fns.values() if fn.concurrency_id == "cpu"}
    assert heavy == {"generate": 1, "img2img": 1, "interpolate": 1, "prepare": 1}
    page = Page(roots)
    loss, lr, latest, history, shot, evals, kid, config = page.run_details("tiny")
    assert list(loss["step"]) == [2, 4] and list(lr.columns) == ["step", "learning_rate"]
    assert latest.endswith("latest.png") and history["maximum"] == 1 and "image_size: 16" in config
    picked = page.pick_run("tiny")
    assert picked[0]["choices"] == ["4", "2"] and picked[4]["visible"] is True  # classes shown
    assert picked[5]["choices"] == ["", "all", "bright", "dark"]
    assert yaml.safe_load(config)["data"]["labels"] == "folders"
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_a_password_protects_the_page(project):
    pytest.importorskip("gradio")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = project["root"] / "ui-auth.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ddpm_tf.cli", "ui", "--runs", str(project["runs"]),
                                    "--configs", str(project["configs"]), "--port", str(port),
                                    "--listen", "127.0.0.1", "--auth", "ann:s3cret"],
                                   stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for(lambda: process.poll() is not None or _answers(url), "ddpm ui to answer")
        assert process.poll() is None, log.read_text(encoding="utf-8")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url + "config", timeout=30)
        assert refused.value.code == 401
        for password, code in (("wrong", 400), ("s3cret", 200)):
            form = urllib.parse.urlencode({"username": "ann", "password": password}).encode()
            try:
                answer = urllib.request.urlopen(url + "login", data=form, timeout=30).status
            except urllib.error.HTTPError as exc:
                answer = exc.code
            assert answer == code
    finally:
        process.terminate()
        process.wait(timeout=60)


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
        return True
    except OSError:
        return False
