"""The opt-in ``python`` tool: the model runs code in the notebook's own namespace.

The model sees what the code printed, the repr of its last expression, and the
traceback if it failed, so it can look at the user's DataFrames and variables.
Approval modes, chosen when the tool is made:

- ``"ask"`` (the default): nothing runs until the user says yes. In a ``%%chat`` cell
  the code shows in the turn's tool block and the answer comes from a prompt
  (``input()``, i.e. Jupyter's input box); in the chat panel from Run / Skip buttons
  (whoever shows the turn registers how to ask with ``asking``). Where neither exists
  (nbclient), asking fails and the model is told to stop.
- ``"auto"``: the code runs without asking. Only for models and prompts you trust:
  the code can do anything your notebook can.
- ``"never"``: the code is never run; the model is told so. The user still sees the
  code it wrote in the tool-call block.

The code runs in a worker thread while the turn waits for it (the kernel's main thread
is busy showing the reply). Output printed by that thread is captured; output of
other threads is not touched. So is what it displays (``display()``, ``plt.show()``,
rich reprs) and any matplotlib figure it leaves open: images go to the model (after
the tool results, see ``_session``) and into the tool's block in the cell; other
displays reach the model as their ``text/plain``. A kernel interrupt raises
``KeyboardInterrupt`` inside the running code (between bytecodes; a blocking C call
finishes first).
"""

from __future__ import annotations

import ast
import base64
import contextlib
import contextvars
import io
import itertools
import linecache
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any, Literal, TextIO, cast, get_args

from ._exceptions import ExecutionFailed
from ._tool_results import DECLINED, CallError
from ._tool_threads import in_thread, waiting_on_user
from ._tools import Tool

__all__ = ["Approval", "asking", "prompt_user", "python_tool", "run_code"]

Approval = Literal["never", "ask", "auto"]
APPROVALS: tuple[str, ...] = get_args(Approval)
Confirm = Callable[[str], bool]

_DESCRIPTION = (
    "Run Python code in the user's Jupyter notebook namespace, where their variables, "
    "DataFrames and imports live. Returns what the code printed and the repr of its "
    "last expression, or the traceback if it raised. State persists between calls. "
    "Prefer printing small summaries (df.head(), df.shape) over whole objects."
)
_counter = itertools.count(1)


# ---------------------------------------------------------------------- output capture


class _ThreadRouter(io.TextIOBase):
    """Stands in for sys.stdout/sys.stderr: writes from capturing threads go to their buffer.

    A global ``redirect_stdout`` would also swallow what the user's own code prints
    while a (possibly abandoned) tool thread runs; routing by thread does not.
    """

    def __init__(self, target: TextIO) -> None:
        super().__init__()
        self.target = target
        self.buffers: dict[int, io.StringIO] = {}

    def write(self, s: str) -> int:
        buffer = self.buffers.get(threading.get_ident())
        if buffer is not None:
            return buffer.write(s)
        return self.target.write(s)

    def flush(self) -> None:
        if threading.get_ident() not in self.buffers:
            self.target.flush()

    def writable(self) -> bool:
        return True

    def __getattr__(self, name: str) -> Any:
        return getattr(self.target, name)


_router_lock = threading.Lock()


def _display_router() -> Any:
    """A DisplayPublisher that keeps what capturing threads display, forwarding the rest.

    Installed on the IPython shell while some thread captures (``None`` outside IPython).
    """
    try:
        from IPython.core.displaypub import DisplayPublisher
        from IPython.core.interactiveshell import InteractiveShell
    except ImportError:
        return None
    if not InteractiveShell.initialized():
        return None

    class Router(DisplayPublisher):
        def __init__(self, target: Any) -> None:
            super().__init__(shell=target.shell)  # type: ignore[no-untyped-call]
            self.target = target
            self.captured: dict[int, list[dict[str, Any]]] = {}

        def publish(self, data: Any, metadata: Any = None, *args: Any, **kwargs: Any) -> None:
            kept = self.captured.get(threading.get_ident())
            if kept is None:
                self.target.publish(data, metadata, *args, **kwargs)
            else:
                kept.append(dict(data or {}))

        def clear_output(self, wait: bool = False) -> None:
            if threading.get_ident() not in self.captured:
                self.target.clear_output(wait)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.target, name)

    shell = InteractiveShell.instance()
    current = shell.display_pub
    if getattr(current, "captured", None) is not None:
        return current
    router = Router(current)
    shell.display_pub = router
    return router


@contextlib.contextmanager
def _capturing_displays() -> Iterator[list[dict[str, Any]]]:
    """What this thread displays meanwhile, as mime bundles; open figures left become one each."""
    kept: list[dict[str, Any]] = []
    figures_before = _open_figures()
    with _router_lock:
        router = _display_router()
        if router is not None:
            router.captured[threading.get_ident()] = kept
    try:
        yield kept
    finally:
        with _router_lock:
            if router is not None:
                router.captured.pop(threading.get_ident(), None)
                if not router.captured:
                    router.shell.display_pub = router.target
        for number in _open_figures() - figures_before:  # drawn, never shown
            kept.append({"figure": number})


def _open_figures() -> set[int]:
    pyplot = sys.modules.get("matplotlib.pyplot")
    return set(pyplot.get_fignums()) if pyplot is not None else set()


def _displayed(kept: list[dict[str, Any]]) -> tuple[list[str], list[Any]]:
    """The text and images of captured displays (figures are drawn, then closed)."""
    from ._images import to_image

    texts: list[str] = []
    images: list[Any] = []
    for bundle in kept:
        if "figure" in bundle:
            pyplot = sys.modules["matplotlib.pyplot"]
            figure = pyplot.figure(bundle["figure"])
            images.append(to_image(figure, name="figure"))
            pyplot.close(figure)
            continue
        mime = next((m for m in ("image/png", "image/jpeg") if m in bundle), None)
        if mime is not None:
            raw = bundle[mime]
            data = base64.b64decode(raw) if isinstance(raw, str) else bytes(raw)
            images.append(to_image(data, name="display"))
        elif "text/plain" in bundle:
            texts.append(str(bundle["text/plain"]))
    return texts, images


def _capture(name: Literal["stdout", "stderr"], buffer: io.StringIO) -> None:
    with _router_lock:
        current = getattr(sys, name)
        router = current if isinstance(current, _ThreadRouter) else _ThreadRouter(current)
        router.buffers[threading.get_ident()] = buffer
        setattr(sys, name, router)


def _release(name: Literal["stdout", "stderr"]) -> None:
    with _router_lock:
        router = getattr(sys, name)
        if not isinstance(router, _ThreadRouter):  # someone replaced the stream meanwhile
            return
        router.buffers.pop(threading.get_ident(), None)
        if not router.buffers:
            setattr(sys, name, router.target)


# ---------------------------------------------------------------------- running code


def run_code(code: str, namespace: dict[str, Any]) -> str | list[Any]:
    """Run ``code`` in ``namespace``; return its output and last expression's repr as text,
    followed by the images it displayed (``[text, image, ...]``) if it displayed any.

    Raises ``ExecutionFailed`` (output so far + traceback) when the code raises,
    ``KeyboardInterrupt`` included.
    """
    filename = f"<nbchat-python-{next(_counter)}>"
    # Registered so tracebacks can quote the model's code.
    linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
    out, err = io.StringIO(), io.StringIO()
    value: Any = None
    has_value = False
    _capture("stdout", out)
    _capture("stderr", err)
    displays = _capturing_displays()
    kept = displays.__enter__()
    try:
        tree = ast.parse(code, filename, "exec")
        last = tree.body[-1] if tree.body else None
        if isinstance(last, ast.Expr):
            tree.body.pop()
        exec(compile(tree, filename, "exec"), namespace)
        if isinstance(last, ast.Expr):
            expression = ast.Expression(last.value)
            value = eval(compile(expression, filename, "eval"), namespace)
            has_value = value is not None
    except BaseException as exc:
        failure: BaseException | None = exc
    else:
        failure = None
    finally:
        displays.__exit__(None, None, None)
        _release("stdout")
        _release("stderr")
    parts = _sections(out.getvalue(), err.getvalue())
    texts, images = _displayed(kept)
    if texts:
        parts.append("displayed:\n" + "\n".join(texts))
    if failure is not None:
        parts.append("error:\n" + _format_error(failure, filename))
        raise ExecutionFailed("\n".join(parts)) from None
    if has_value:
        from ._images import is_image

        if is_image(value):  # a figure as the last expression is shown, as in a cell
            images.append(value)
            parts.append("result: an image (it follows)")
        else:
            parts.append("result:\n" + repr(value))
    text = "\n".join(parts) or "(the code ran; it printed nothing and returned nothing)"
    return [text, *images] if images else text


def _sections(stdout: str, stderr: str) -> list[str]:
    parts = []
    if stdout:
        parts.append("stdout:\n" + stdout.rstrip("\n"))
    if stderr:
        parts.append("stderr:\n" + stderr.rstrip("\n"))
    return parts


def _format_error(exc: BaseException, filename: str) -> str:
    """The traceback from the model's code down, without nbchat's own frames."""
    if isinstance(exc, SyntaxError):
        return "".join(traceback.format_exception_only(exc)).rstrip()
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != filename:
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb)).rstrip()


# ---------------------------------------------------------------------- approval


#: Who asks the user while a turn is shown: the cell renderer or the panel sets it for
#: the turn (``asking``), so the question appears in the tool's block. A context
#: variable, because the code runs in a worker thread started from the turn's context.
_asker: contextvars.ContextVar[Confirm | None] = contextvars.ContextVar(
    "nbchat_asker", default=None
)


@contextlib.contextmanager
def asking(confirm: Confirm) -> Iterator[None]:
    """Within the block, ``python:ask`` tools ask through ``confirm(code) -> bool``."""
    token = _asker.set(confirm)
    try:
        yield
    finally:
        _asker.reset(token)


def ask_in_notebook(code: str) -> bool:
    """Ask the user whether to run ``code``: through the turn's display, or in the cell."""
    confirm = _asker.get()
    if confirm is not None:
        return confirm(code)
    try:
        from IPython.display import Markdown, display

        shown = f"**The model wants to run this code:**\n\n```python\n{code}\n```"
        display(Markdown(shown))  # type: ignore[no-untyped-call]
    except ImportError:  # plain Python: the prompt alone has to do
        print(f"The model wants to run this code:\n{code}")
    return prompt_user()


def prompt_user() -> bool:
    """``input()`` a yes/no answer; PermissionError where the frontend has no input box."""
    from IPython.core.error import StdinNotImplementedError

    try:
        answer = input("Run it? [y/N] ")
    except StdinNotImplementedError:
        raise PermissionError(
            "cannot ask the user for approval here (this frontend has no input box); "
            "do not retry. The user can allow code with --tools python:auto."
        ) from None
    except EOFError:
        answer = ""
    return answer.strip().lower() in {"y", "yes"}


def _default_namespace() -> dict[str, Any]:
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:
        shell = None
    if shell is not None:
        return cast(dict[str, Any], shell.user_ns)
    import __main__

    return cast(dict[str, Any], __main__.__dict__)


def python_tool(
    namespace: dict[str, Any] | None = None,
    *,
    approval: Approval = "ask",
    confirm: Confirm | None = None,
    name: str = "python",
) -> Tool:
    """A tool that runs the model's Python code in ``namespace`` (default: the notebook's).

    ``approval`` is ``"ask"`` (show the code, run it only if the user says yes),
    ``"auto"`` (run without asking) or ``"never"`` (never run). ``confirm(code) -> bool``
    replaces the question asked in ``"ask"`` mode.
    """
    if approval not in APPROVALS:
        raise ValueError(f"approval must be one of {', '.join(APPROVALS)}, not {approval!r}")
    ns = namespace if namespace is not None else _default_namespace()
    ask = confirm or ask_in_notebook

    def work(code: str) -> str | list[Any]:
        if approval == "ask":
            with waiting_on_user():  # the call's duration is the code's, not the user's
                approved = ask(code)
            if not approved:
                # Not a failure: the call's own outcome, so tallies do not count it an error.
                raise CallError(DECLINED, "the user declined to run this code; do not retry it")
        return run_code(code, ns)

    async def python(code: str) -> str | list[Any]:
        """Run Python code in the user's notebook namespace and return its output.

        Args:
            code: Python source; the value of a final expression is returned as its repr.
        """
        if approval == "never":
            raise PermissionError(
                "running code is switched off in this notebook (approval='never'); "
                "show the user the code instead"
            )
        result: str | list[Any] = await in_thread(
            work, [code], {}, "python", interrupt_on_cancel=True
        )
        return result

    return Tool(python, name=name, description=_DESCRIPTION)
