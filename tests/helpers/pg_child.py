"""Child processes for the team-store tests: ``python pg_child.py MODE ARGS...``.

Each mode prints one JSON line on stdout when it finishes.

* ``turns URL N LABEL``: a session on the store at URL chats N turns with its own fake
  model server, each user message ``"<LABEL> turn <i>"``.
* ``open URL GO``: waits for the file GO to exist, then opens the store (migrating a
  fresh database), to race other processes doing the same.
* ``spool URL READY GO``: opens the store, touches READY, waits for GO (the server is
  stopped meanwhile), writes a session's turn (so it is spooled) and exits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def turns(url: str, count: str, label: str) -> None:
    from nbchat import Session
    from nbchat.testing import FakeOpenAIServer

    with FakeOpenAIServer() as fake:
        session = Session(model="m", base_url=fake.url, api_key="k", db=url, max_retries=0)
        done = 0
        for i in range(int(count)):
            fake.enqueue(f"{label} answer {i}", usage={"prompt_tokens": 10, "completion_tokens": 2})
            result = session.send(f"{label} turn {i}")
            done += result.status == "completed"
    print(json.dumps({"session_id": session.id, "completed": done}))


def open_when_told(url: str, go: str) -> None:
    from nbchat._store import Store

    while not Path(go).exists():
        time.sleep(0.001)
    with Store.open(url, lock_timeout=60) as store:
        opened = store.has_session("nobody")
    print(json.dumps({"opened": not opened}))


def spool(url: str, ready: str, go: str) -> None:
    from nbchat._events import MessageAdded, TurnStarted
    from nbchat._store import Store
    from nbchat._types import Message

    store = Store.open(url)
    Path(ready).touch()
    while not Path(go).exists():
        time.sleep(0.01)
    store.create_session(session_id="spooled", model="m", system_prompt=None)
    store.write(TurnStarted(session_id="spooled", turn_id="t1", text="written while away"))
    message = Message(role="user", content="written while away", seq=0, turn_id="t1")
    store.write(MessageAdded(session_id="spooled", turn_id="t1", message=message))
    print(json.dumps({"online": store.stats()["online"]}))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    {"turns": turns, "open": open_when_told, "spool": spool}[mode](*args)
