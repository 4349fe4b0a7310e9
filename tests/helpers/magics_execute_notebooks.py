"""Re-run the notebooks in ``notebooks/`` against the deterministic fake model, saving outputs.

    python tests/helpers/magics_execute_notebooks.py [notebooks/quickstart.ipynb ...]

The saved outputs are what ``pytest --nbval-lax notebooks/`` compares the cells marked
``# NBVAL_CHECK_OUTPUT`` with; nbclient applies display updates, so streamed replies
are saved as they ended.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import nbformat
from magics_fake_model import notebook_server
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[2]


def main(paths: list[str]) -> None:
    notebooks = [Path(p) for p in paths] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    server = notebook_server()
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("NBCHAT_API_KEY", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
            os.environ.pop(name, None)
        os.environ.update(
            NBCHAT_BASE_URL=server.url,
            NBCHAT_MODEL="fake-model",
            NBCHAT_DB=str(Path(tmp) / "notebooks.duckdb"),
        )
        try:
            for path in notebooks:
                nb = nbformat.read(path, as_version=4)
                NotebookClient(
                    nb, timeout=120, resources={"metadata": {"path": str(path.parent)}}
                ).execute()
                for cell in nb.cells:
                    cell.get("metadata", {}).pop("execution", None)
                nbformat.write(nb, path)
                print(f"executed {path}")
        finally:
            server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
