"""The warm-up ``%load_ext`` starts in a kernel leaves nothing for the first turn to load.

Each check runs in a fresh interpreter, since what matters is what is imported or opened
for the first time. Behaviour only: which modules and files are ready, never timings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from nbchat.testing import FakeOpenAIServer

ROOT = Path(__file__).resolve().parents[1]
LOADED_BY_THE_WARM_UP = {
    *("nbchat", "openai", "pydantic", "pandas", "duckdb", "certifi", "truststore"),
    *("aiohttp", "httpx", "httpx2", "httpcore", "httpcore2", "h11", "anyio"),
}

FIRST_TURN = """
import json, os, sys
from IPython.core.interactiveshell import InteractiveShell
from nbchat import _magics, _runner

_magics._warm_up()
ready = {
    "store_file": os.path.exists(os.environ["NBCHAT_DB"]),
    "loop_alive": _runner.loop_alive(),
}
shell = InteractiveShell.instance()
shell.run_line_magic("load_ext", "nbchat")  # no kernel here: no warm-up thread of its own
before = set(sys.modules)
shell.run_cell_magic("chat", "", "hello")
print(json.dumps({**ready, "imported": sorted(set(sys.modules) - before)}))
"""


def _run(code: str, db: Path | str, base_url: str = "http://127.0.0.1:9") -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NBCHAT_", "OPENAI_"))}
    env.update(
        NBCHAT_BASE_URL=base_url,
        NBCHAT_MODEL="fake-model",
        NBCHAT_DB=str(db),
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
    return result


def test_after_the_warm_up_the_first_turn_imports_nothing_of_its_own(
    fake: FakeOpenAIServer, tmp_path: Path
) -> None:
    fake.enqueue("hi there")
    ready = _run(FIRST_TURN, tmp_path / "store.duckdb", fake.url)
    assert ready["store_file"], "the warm-up creates and migrates the store file"
    assert ready["loop_alive"]
    imported = ready["imported"]
    assert isinstance(imported, list)
    # nbchat's own modules, the HTTP stack under openai, the SSL context's modules.
    late = [m for m in imported if m.split(".")[0] in LOADED_BY_THE_WARM_UP]
    assert late == []


def test_the_warm_up_leaves_a_stores_recovery_files_to_the_first_turn(tmp_path: Path) -> None:
    # Importing them warns the user, which a thread would do where nobody looks.
    db = tmp_path / "store.duckdb"
    leftover = tmp_path / "store.duckdb.nbchat-recovery-1234.jsonl"
    leftover.write_text("")
    ready = _run(
        "import json, os\nfrom nbchat._store import warm_up\nwarm_up()\n"
        "print(json.dumps({'opened': os.path.exists(os.environ['NBCHAT_DB'])}))",
        db,
    )
    assert ready == {"opened": False}
    assert leftover.exists()


def test_the_warm_up_does_not_connect_to_a_team_store() -> None:
    ready = _run(
        "import json, sys\nfrom nbchat._store import warm_up\nwarm_up()\n"
        "print(json.dumps({'pg': [m for m in sys.modules if m.startswith('psycopg')]}))",
        "postgresql://nobody@127.0.0.1:9/nbchat",
    )
    assert ready == {"pg": []}
    assert not (ROOT / "postgresql:").exists()  # nor taken for a file path
