"""``notebooks/demo.ipynb`` runs top to bottom headless: trains a tiny checkpoint on the tiny
random LM (no checkpoint given, as on a fresh machine), shows predictions, builds the app."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "demo.ipynb"


def outputs_text(cell) -> str:
    return "".join(o.get("text", "") + "".join(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)


def test_demo_notebook_runs_headless(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MM_LLAMA_DEMO_CHECKPOINT", raising=False)
    for name, value in {"MM_LLAMA_DEMO_LM": str(tiny_lm_dir), "MM_LLAMA_DEMO_STEPS": "2",
                        "MM_LLAMA_DEMO_OUT": str(tmp_path / "run"), "MM_LLAMA_DEMO_NO_LAUNCH": "1",
                        "OMP_NUM_THREADS": "1"}.items():  # the kernel inherits the environment
        monkeypatch.setenv(name, value)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "commit it without outputs"
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(o.get("output_type") != "error" for c in code for o in c.outputs)
    assert (tmp_path / "run" / "adapter.ckpt").is_file() and (tmp_path / "run" / "config.yaml").is_file()
    text = "\n".join(outputs_text(c) for c in code)
    assert f"checkpoint: {tmp_path / 'run' / 'adapter.ckpt'}" in text
    assert text.count("(target ") == 4  # four predictions printed beside their targets
    figures = [o for c in code for o in c.outputs if "image/png" in o.get("data", {})]
    assert figures, "the predictions figure is shown inline"
    assert "the app is built but not served" in text
    assert len(list((tmp_path / "run" / "examples").glob("scene-*.png"))) == 4
