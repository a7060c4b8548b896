"""`ddpm ui`: a local web page (Gradio) over the runs folder. `app.py` is the page's layout and server; the
other modules are what its controls do, plain Python and testable without a browser: `roots.py` (what the
page may read), `browse.py` (runs, metrics, previews, evaluations), `studio.py` (generation with runs kept
loaded), `trainer.py` (a `ddpm train` process) and `dataset.py` (`ddpm prepare` and its report)."""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before app.py imports Gradio: no telemetry
