"""The page of `ddpm ui`: the Gradio layout of its five tabs, wired to the plain-Python modules beside it, and
the server (loopback by default, password-protected elsewhere, nothing fetched from the internet).

Sampling, img2img, interpolation and prepare share one queue slot (`concurrency_id="cpu"`): a second request
waits for the first instead of halving both on the same cores. Reading files (the Runs tab, the trainer's
progress) runs beside them.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import gradio as gr
import pandas as pd  # a dependency of Gradio

from ..errors import DataError, PathError, UserError
from ..runs import RunDir
from ..samplers import SAMPLER_NAMES
from . import browse, dataset
from .roots import Roots
from .studio import Studio, conditions, label_choices, seed_of
from .trainer import Trainers

# System fonts only: Gradio's default theme would fetch Source Sans Pro from Google Fonts.
THEME = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                          font_mono=["ui-monospace", "Consolas", "monospace"])
HEAVY = {"concurrency_id": "cpu", "concurrency_limit": 1}
PICTURE = 280  # pixels: a grid or preview shown at this height, however small its images


def shown(fn):
    """A page handler whose user errors (and file system failures) appear as one line in the page."""

    @functools.wraps(fn)
    def handler(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except OSError as exc:
            raise gr.Error(f"{exc.filename or ''}: {exc.strerror or exc}", print_exception=False) from None

    return handler


def _curve_frame(points, name: str) -> pd.DataFrame:
    return pd.DataFrame(points or [], columns=["step", name])


class Page:
    """The handlers of the page's controls over one set of roots."""

    def __init__(self, roots: Roots):
        self.roots, self.studio, self.trainers = roots, Studio(roots), Trainers(roots)

    def run_names(self) -> list[str]:
        return [r["name"] for r in browse.list_runs(self.roots.runs)]

    # --- Generate ----------------------------------------------------------------------------------
    def pick_run(self, name):
        """The checkpoints, sampler defaults and label controls of the chosen run."""
        if not name:
            return gr.update(choices=[], value=None), gr.update(), gr.update(), gr.update(), \
                gr.update(visible=False), gr.update(), gr.update()
        path = self.roots.run(name)
        steps = [str(s) for s in browse.checkpoints(path)]
        sample = RunDir(path).load_config().sample
        mode, names = label_choices(path)
        return (gr.update(choices=steps, value=steps[0] if steps else None), gr.update(value=sample.sampler),
                gr.update(value=sample.steps), gr.update(value=sample.eta), gr.update(visible=mode is not None),
                gr.update(choices=["", "all", *names] if mode == "folders" else [""], value="",
                          visible=mode == "folders"),
                gr.update(visible=mode == "tags", placeholder=", ".join(names[:3])))

    def generate(self, run, checkpoint, sampler, steps, eta, seeds, first_seed, n, class_name, tags, guidance,
                 progress=gr.Progress()):
        labelled = self._labelled(run)
        grid, images = self.studio.generate(run, checkpoint, sampler=sampler, steps=steps, eta=eta,
                                            seeds_text=seeds, first_seed=first_seed or 0, n=n,
                                            labels=conditions(class_name, tags, guidance, labelled), progress=progress)
        names = [str(p) for p in images]
        info = f"{len(images)} images in `{self._shown(images[0].parent)}`; grid `{self._shown(grid)}`"
        return [(p, f"seed {seed_of(p)}") for p in names], str(grid), [str(grid), *names], names, info

    def _labelled(self, run) -> bool:
        """Whether the chosen run has labels (its class, tags and guidance controls apply)."""
        if not run:
            raise PathError("choose a run first (none under the runs folder yet? train one in the Train tab)")
        return label_choices(self.roots.run(run))[0] is not None

    def _shown(self, path: Path) -> str:
        """A path as the page shows it: relative to the runs folder."""
        return str(Path(path).resolve().relative_to(self.roots.runs))

    def reuse_seed(self, paths, evt: gr.SelectData):
        return str(seed_of(paths[evt.index]))

    def img2img(self, run, checkpoint, upload, path, strength, seed, steps, class_name, tags, guidance):
        if upload:
            image, name = Path(upload), Path(upload).name  # Gradio's temporary copy; decoded with prepare's guards
        elif (path or "").strip():
            image = self.roots.check(path, "image")
            name = str(image)
        else:
            raise gr.Error("upload an image, or give the path of one under the runs, configs or data folders")
        labelled = self._labelled(run)
        try:
            result, pair = self.studio.img2img(run, checkpoint, image, source_name=name, strength=strength,
                                               seed=seed, steps=steps,
                                               labels=conditions(class_name, tags, guidance, labelled))
        except DataError as exc:  # prepare's guards: name the upload, not Gradio's temporary copy
            raise DataError(str(exc).replace(str(image), name)) from None
        return str(result), str(pair)

    def interpolate(self, run, checkpoint, seed_a, seed_b, frames, steps, class_name, tags, guidance):
        labelled = self._labelled(run)
        strip, gif = self.studio.interpolate(run, checkpoint, seed_a, seed_b, frames=frames, steps=steps,
                                             labels=conditions(class_name, tags, guidance, labelled))
        return str(strip), str(gif)

    # --- Runs --------------------------------------------------------------------------------------
    def run_choices(self):
        names = self.run_names()
        return gr.update(choices=names)

    def runs_overview(self):
        names = self.run_names()
        return browse.runs_table(self.roots.runs), gr.update(choices=names, value=names[0] if names else None)

    def run_details(self, name):
        if not name:
            return None, None, None, gr.update(maximum=0, value=0), None, None, None, ""
        path = self.roots.run(name)
        curves = browse.metrics_curves(path)
        history = browse.previews(path)
        header, rows = browse.eval_table(path)
        evals = pd.DataFrame(rows, columns=header) if header else pd.DataFrame(
            {"eval.csv": ["no evaluation yet: run ddpm eval, or train with train.eval_every"]})
        latest = browse.latest_preview(path)
        return (_curve_frame(curves["loss"], "loss"), _curve_frame(curves["learning_rate"], "learning_rate"),
                str(latest) if latest else None,
                gr.update(maximum=max(0, len(history) - 1), value=max(0, len(history) - 1)),
                self.preview_at(name, len(history) - 1), evals,
                _curve_frame(browse.kid_curve(path), "kid"), browse.config_text(path))

    def preview_at(self, name, index):
        history = browse.previews(self.roots.run(name)) if name else []
        if not history:
            return None
        step, path = history[min(max(int(index or 0), 0), len(history) - 1)]
        return gr.update(value=str(path), label=f"preview at step {step}")

    # --- Train -------------------------------------------------------------------------------------
    def train_status(self, name):
        name = (name or "").strip()
        if not name or not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", name):
            return "", None, ""
        status = self.trainers.status(name)
        return status["text"], str(status["preview"]) if status["preview"] else None, status["log"]

    def start_training(self, config, name, overrides):
        run_name = (name or "").strip() or Path(config or "").stem
        self.trainers.start(config, run_name, overrides)
        return (run_name, *self.train_status(run_name))

    def stop_training(self, name):
        message = self.trainers.stop(name)
        text, preview, log = self.train_status(name)
        return f"{message}\n\n{text}", preview, log

    # --- Data --------------------------------------------------------------------------------------
    def prepare(self, source, folder):
        report = dataset.prepare_report(self.roots, source, folder)
        return (report.summary, pd.DataFrame(report.counts, columns=["reason", "files"]),
                pd.DataFrame(report.skipped, columns=["file", "reason", "detail"]), report.thumbnails, report.balance)


def _generate_tab(page: Page, runs: list[str]):
    with gr.Row():
        run = gr.Dropdown(runs, value=runs[0] if runs else None, label="Run (newest first)", elem_id="gen-run")
        checkpoint = gr.Dropdown([], label="Checkpoint (training step)", elem_id="gen-checkpoint")
    with gr.Row():
        sampler = gr.Dropdown(list(SAMPLER_NAMES), value="ddim", label="Sampler", elem_id="gen-sampler")
        steps = gr.Number(0, precision=0, minimum=0, label="Steps (0: the sampler's default)", elem_id="gen-steps")
        eta = gr.Slider(0, 1, value=0, step=0.05, label="eta (DDIM: 0 deterministic, 1 DDPM-like)")
    with gr.Row():
        seeds = gr.Textbox(label="Seeds (comma-separated; empty: first seed, first seed + 1, ...)", max_lines=1,
                           elem_id="gen-seeds")
        first_seed = gr.Number(0, precision=0, minimum=0, label="First seed", elem_id="gen-first-seed")
        n = gr.Slider(1, 64, value=4, step=1, label="Images", elem_id="gen-n")
    with gr.Row(visible=False) as label_row:
        class_name = gr.Dropdown([""], value="", label="Class ('all': one row each)", elem_id="gen-class")
        tags = gr.Textbox(label="Tags (comma-separated)", elem_id="gen-tags")
        guidance = gr.Slider(0, 10, value=2, step=0.5, label="Guidance (1 conditional, 0 unconditional)")
    go = gr.Button("Generate", variant="primary", elem_id="generate")
    info = gr.Markdown(elem_id="gen-info")
    gallery = gr.Gallery(label="Images (click one to reuse its seed)", columns=8, height="auto",
                         show_download_button=True, elem_id="gallery")
    with gr.Row():
        grid = gr.Image(label="Grid", type="filepath", interactive=False, height=PICTURE, elem_id="grid")
        files = gr.File(label="Download", file_count="multiple", interactive=False, elem_id="files")
    paths = gr.State([])
    picked = [checkpoint, sampler, steps, eta, label_row, class_name, tags]
    run.change(shown(page.pick_run), run, picked)
    go.click(shown(page.generate), [run, checkpoint, sampler, steps, eta, seeds, first_seed, n, class_name, tags,
                                    guidance], [gallery, grid, files, paths, info], **HEAVY)
    gallery.select(shown(page.reuse_seed), paths, seeds)
    return run, checkpoint, (class_name, tags, guidance), picked


def _img2img_tab(page: Page, run, checkpoint, labels):
    gr.Markdown("The image is prepared like training data (`ddpm prepare`'s checks, crop and size); results go to "
                "the run's `samples/`.")
    with gr.Row():
        upload = gr.File(label="Upload an image", file_types=["image"], type="filepath", elem_id="i2i-upload")
        path = gr.Textbox(label="... or a path under the runs, configs or data folders", max_lines=1,
                          elem_id="i2i-path")
    with gr.Row():
        strength = gr.Slider(0, 1, value=0.5, step=0.05, label="Strength (0 keeps it, 1 from noise)")
        seed = gr.Number(0, precision=0, minimum=0, label="Seed")
        steps = gr.Number(0, precision=0, minimum=0, label="DDIM steps (0: default)")
    go = gr.Button("img2img", variant="primary", elem_id="i2i-go")
    with gr.Row():
        result = gr.Image(label="Result", type="filepath", interactive=False, height=PICTURE, elem_id="i2i-result")
        pair = gr.Image(label="Before / after", type="filepath", interactive=False, height=PICTURE)
    go.click(shown(page.img2img), [run, checkpoint, upload, path, strength, seed, steps, *labels], [result, pair],
             **HEAVY)
    gr.Markdown("### Interpolate between two seeds")
    with gr.Row():
        seed_a = gr.Number(0, precision=0, minimum=0, label="Seed A")
        seed_b = gr.Number(1, precision=0, minimum=0, label="Seed B")
        frames = gr.Slider(2, 64, value=8, step=1, label="Frames")
        isteps = gr.Number(0, precision=0, minimum=0, label="DDIM steps (0: default)")
    morph = gr.Button("Interpolate", elem_id="interp-go")
    with gr.Row():
        strip = gr.Image(label="Strip", type="filepath", interactive=False, height=PICTURE)
        gif = gr.Image(label="GIF", type="filepath", interactive=False, height=PICTURE)
    morph.click(shown(page.interpolate), [run, checkpoint, seed_a, seed_b, frames, isteps, *labels], [strip, gif],
                **HEAVY)


def _runs_tab(page: Page):
    table = gr.Dataframe(headers=list(browse.RUN_COLUMNS), interactive=False, elem_id="runs-table")
    with gr.Row():
        pick = gr.Dropdown([], label="Run", elem_id="runs-pick")
        refresh = gr.Button("Refresh", elem_id="runs-refresh")
    with gr.Row():
        loss = gr.LinePlot(x="step", y="loss", title="loss (per epoch)", elem_id="loss-plot")
        lr = gr.LinePlot(x="step", y="learning_rate", title="learning rate", elem_id="lr-plot")
    with gr.Row():
        latest = gr.Image(label="latest preview", type="filepath", interactive=False, height=PICTURE,
                          elem_id="latest-preview")
        with gr.Column():
            index = gr.Slider(0, 0, value=0, step=1, label="preview history (oldest to newest)", elem_id="history")
            shot = gr.Image(label="preview", type="filepath", interactive=False, height=PICTURE,
                            elem_id="history-preview")
    with gr.Row():
        evals = gr.Dataframe(interactive=False, label="eval.csv", elem_id="eval-table")
        kid = gr.LinePlot(x="step", y="kid", title="KID over steps", elem_id="kid-plot")
    config = gr.Code(language="yaml", label="resolved config", interactive=False)
    refresh.click(shown(page.runs_overview), None, [table, pick])
    pick.change(shown(page.run_details), pick, [loss, lr, latest, index, shot, evals, kid, config])
    index.release(shown(page.preview_at), [pick, index], shot)
    return table, pick


def _train_tab(page: Page, configs: list[str]):
    gr.Markdown("Training runs as its own process: close the page and come back, it goes on. **Stop** saves a "
                "checkpoint; **Start** again resumes.")
    with gr.Row():
        config = gr.Dropdown(configs, value=configs[0] if configs else None, label="Config", elem_id="train-config")
        name = gr.Textbox(label="Run name (a folder under the runs folder; empty: the config's name)",
                          elem_id="train-name")
    overrides = gr.Textbox(label="Overrides, one SECTION.KEY=VALUE per line", lines=3,
                           placeholder="train.epochs=20\ntrain.batch_size=16", elem_id="train-overrides")
    with gr.Row():
        start = gr.Button("Start", variant="primary", elem_id="train-start")
        stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
    status = gr.Markdown(elem_id="train-status")
    with gr.Row():
        preview = gr.Image(label="newest preview", type="filepath", interactive=False, height=PICTURE,
                           elem_id="train-preview")
        log = gr.Textbox(label="trainer output", lines=10, interactive=False, elem_id="train-log")
    start.click(shown(page.start_training), [config, name, overrides], [name, status, preview, log])
    stop.click(shown(page.stop_training), name, [status, preview, log])
    gr.Timer(2.0).tick(shown(page.train_status), name, [status, preview, log], show_progress="hidden")


def _data_tab(page: Page, sources: list[str]):
    gr.Markdown("Runs `ddpm prepare` with the data section of a config; the folder may be replaced by another "
                "inside the page's folders.")
    with gr.Row():
        source = gr.Dropdown(sources, value=sources[0] if sources else None, label="Config", elem_id="data-source")
        folder = gr.Textbox(label="Folder (empty: the config's data.dir)", elem_id="data-folder")
    go = gr.Button("Prepare", variant="primary", elem_id="data-go")
    summary = gr.Textbox(label="report", lines=8, interactive=False, elem_id="data-summary")
    with gr.Row():
        counts = gr.Dataframe(interactive=False, label="files per reason", elem_id="data-counts")
        skipped = gr.Dataframe(interactive=False, label="skipped files", elem_id="data-skipped")
    thumbs = gr.Gallery(label="used images (first 24)", columns=12, height="auto", elem_id="data-thumbs")
    balance = gr.Textbox(label="class or tag balance", lines=6, interactive=False, elem_id="data-balance")
    go.click(shown(page.prepare), [source, folder], [summary, counts, skipped, thumbs, balance], **HEAVY)


def build(roots: Roots) -> gr.Blocks:
    """The page over `roots`: Generate, img2img & interpolate, Runs, Train, Data."""
    page = Page(roots)
    runs = page.run_names()
    with gr.Blocks(title="ddpm_tf", theme=THEME, analytics_enabled=False) as blocks:
        gr.Markdown(f"## ddpm_tf · runs in `{roots.runs}`")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                run, checkpoint, labels, picked = _generate_tab(page, runs)
            with gr.Tab("img2img & interpolate", id="img2img"):
                _img2img_tab(page, run, checkpoint, labels)
            with gr.Tab("Runs", id="runs"):
                table, pick = _runs_tab(page)
            with gr.Tab("Train", id="train"):
                _train_tab(page, [p.name for p in roots.config_files()])
            with gr.Tab("Data", id="data"):
                _data_tab(page, dataset.data_sources(roots))
        blocks.load(shown(page.runs_overview), None, [table, pick])
        blocks.load(shown(page.run_choices), None, run)  # runs trained since the page started
        blocks.load(shown(page.pick_run), run, picked)
    return blocks


# Gradio's page template names a script on cdnjs and preconnects to Google Fonts; offline, neither may load.
_EXTERNAL = re.compile(rb'<link\s[^>]*rel="preconnect"[^>]*>|<script[^>]*src="https://[^"]*"[^>]*>\s*</script>', re.S)


class Offline:
    """ASGI middleware that removes the template's external script and font links from the page's HTML."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, chunks = {}, []

        async def capture(message):
            if message["type"] == "http.response.start":
                headers = dict(message.get("headers") or [])
                if not headers.get(b"content-type", b"").startswith(b"text/html"):
                    start["pass"] = True
                    return await send(message)
                start["message"] = message
                return None
            if start.get("pass"):
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return None
            body = _EXTERNAL.sub(b"", b"".join(chunks))
            headers = [(k, v) for k, v in start["message"].get("headers", []) if k.lower() != b"content-length"]
            await send({**start["message"], "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return None

        await self.app(scope, receive, capture)


def serve(runs: Path, configs: Path, host: str = "127.0.0.1", port: int = 7860, auth=None, echo=print) -> None:
    """Serve the page until Ctrl-C (which never stops a trainer the page started)."""
    import fastapi
    import uvicorn

    roots = Roots(runs, configs)
    blocks = build(roots)
    blocks.queue(default_concurrency_limit=1)
    app = gr.mount_gradio_app(fastapi.FastAPI(), blocks, path="", auth=auth, allowed_paths=[
        str(f) for f in roots.folders()], show_error=True, ssr_mode=False, pwa=False, mcp_server=False)
    shown_host = f"[{host}]" if ":" in host else host
    echo(f"ddpm ui: http://{shown_host}:{port}/ (runs {roots.runs}, configs {roots.configs}); Ctrl-C stops the page, "
         "not a training it started")
    # An open tab keeps a stream open; Ctrl-C or SIGTERM closes the page within seconds even so.
    uvicorn.run(Offline(app), host=host, port=port, log_level="warning", timeout_graceful_shutdown=3)
