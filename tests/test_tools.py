"""Tools: schema from type hints and docstrings, validated calls, concurrent runs, results."""

import asyncio
import enum
import functools
import json
import subprocess
import sys
import threading
import time
from typing import Annotated, Any, Literal

import pandas as pd
import pytest
from pydantic import BaseModel, Field

from nbchat import ToolDefinitionError
from nbchat._tools import Tool, ToolSet, as_tool, error_payload, serialise_result, tool
from nbchat._types import ToolCall, ToolCallRecord


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Point(BaseModel):
    """A point on the plane."""

    x: int
    y: int = 0


def props(t: Tool) -> dict[str, Any]:
    return t.parameters["properties"]  # type: ignore[no-any-return]


def call(name: str, arguments: str = "", id: str = "c1") -> ToolCall:
    return ToolCall(id=id, name=name, arguments=arguments)


def run(ts: ToolSet, *calls: ToolCall) -> list[ToolCallRecord]:
    return asyncio.run(ts.run(list(calls)))


def run1(t: Any, arguments: str = "") -> ToolCallRecord:
    ts = ToolSet([t])
    return run(ts, call(ts.names()[0], arguments))[0]


# --------------------------------------------------------------------------- schema


def test_schema_of_scalar_container_optional_literal_types() -> None:
    @tool
    def f(
        s: str,
        i: int,
        x: float,
        b: bool,
        ints: list[int],
        scores: dict[str, float],
        maybe: int | None = None,
        mode: Literal["fast", "slow"] = "fast",
        anything=None,  # type: ignore[no-untyped-def]
    ) -> None:
        """Do it."""

    p = props(f)
    assert p["s"] == {"type": "string"}
    assert p["i"] == {"type": "integer"}
    assert p["x"] == {"type": "number"}
    assert p["b"] == {"type": "boolean"}
    assert p["ints"] == {"type": "array", "items": {"type": "integer"}}
    assert p["scores"] == {"type": "object", "additionalProperties": {"type": "number"}}
    assert p["maybe"] == {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None}
    assert p["mode"] == {"type": "string", "enum": ["fast", "slow"], "default": "fast"}
    assert p["anything"] == {"default": None}  # no annotation: any JSON value
    assert f.parameters["required"] == ["s", "i", "x", "b", "ints", "scores"]
    assert f.parameters["type"] == "object"
    assert f.parameters["additionalProperties"] is False


def test_schema_of_enum_and_pydantic_model_has_defs_and_no_titles() -> None:
    @tool
    def place(at: Point, color: Color = Color.RED) -> str:
        """Place a dot."""
        return ""

    params = place.parameters
    assert params["properties"]["at"] == {"$ref": "#/$defs/Point"}
    assert params["properties"]["color"] == {"$ref": "#/$defs/Color", "default": "red"}
    assert params["$defs"]["Color"] == {"type": "string", "enum": ["red", "blue"]}
    assert params["$defs"]["Point"] == {
        "type": "object",
        "description": "A point on the plane.",
        "properties": {"x": {"type": "integer"}, "y": {"type": "integer", "default": 0}},
        "required": ["x"],
    }
    assert '"title"' not in json.dumps(params)
    assert params["required"] == ["at"]


def test_a_property_called_title_survives_tidying() -> None:
    @tool
    def note(title: str, body: dict[str, str] | None = None) -> str:
        """Write a note."""
        return title

    assert props(note)["title"] == {"type": "string"}


def test_no_parameters_gives_an_empty_object_schema() -> None:
    @tool
    def now() -> str:
        """The time."""
        return "12:00"

    assert now.parameters == {"type": "object", "properties": {}, "additionalProperties": False}
    assert now.openai_schema() == {
        "type": "function",
        "function": {"name": "now", "description": "The time.", "parameters": now.parameters},
    }


def test_google_docstring_gives_description_and_parameter_docs() -> None:
    @tool
    def weather(city: str, days: int = 1, units: Annotated[str, Field(description="C/F")] = "C"):  # type: ignore[no-untyped-def]
        """Current weather for a city.

        Looks it up in a table; the second paragraph is not the description.

        Args:
            city: Name of the city,
                in English.
            days (int): How many days ahead.
            units: ignored because the Field says otherwise.

        Returns:
            A dict.
        """

    assert weather.description == "Current weather for a city."
    p = props(weather)
    assert p["city"] == {"description": "Name of the city, in English.", "type": "string"}
    assert p["days"]["description"] == "How many days ahead."
    assert p["units"]["description"] == "C/F"  # an explicit Field description wins


def test_sphinx_docstring_and_multi_line_summary() -> None:
    @tool
    def area(w: float, h: float) -> float:
        """Area of a
        rectangle.

        :param w: the width
        :param float h: the height,
            in metres
        :returns: the area
        """
        return w * h

    assert area.description == "Area of a rectangle."
    assert props(area)["w"]["description"] == "the width"
    assert props(area)["h"]["description"] == "the height, in metres"


def test_no_docstring_gives_empty_description_and_explicit_description_wins() -> None:
    def bare(x: int) -> int:
        return x

    assert as_tool(bare).description == ""
    assert tool(bare, description="Echo a number.").description == "Echo a number."


# --------------------------------------------------------------------------- definition


def test_decorator_forms_and_the_tool_stays_callable() -> None:
    @tool
    def a(x: int) -> int:
        """A."""
        return x + 1

    @tool()
    def b(x: int) -> int:
        """B."""
        return x + 2

    @tool(name="renamed-c", description="Custom.")
    async def c(x: int) -> int:
        return x + 3

    assert isinstance(a, Tool) and isinstance(b, Tool) and isinstance(c, Tool)
    assert (a.name, b.name, c.name) == ("a", "b", "renamed-c")
    assert c.description == "Custom."
    assert a(1) == 2 and b(x=1) == 3 and asyncio.run(c(1)) == 4
    assert (a.is_async, c.is_async) == (False, True)
    assert a.__doc__ == "A."
    again = tool(a, name="a2")
    assert again.name == "a2" and again.fn is a.fn and again.description == "A."


def test_plain_callables_partials_methods_and_instances_are_accepted() -> None:
    def add(x: int, y: int) -> int:
        """Add two numbers."""
        return x + y

    class Counter:
        """Counts calls."""

        def __init__(self) -> None:
            self.n = 0

        def bump(self, by: int = 1) -> int:
            """Increase the count."""
            self.n += by
            return self.n

        def __call__(self, by: int) -> int:
            return self.bump(by)

    counter = Counter()
    t = as_tool(add)
    assert as_tool(t) is t
    assert run1(add, '{"x": 2, "y": 3}').result == "5"
    assert run1(counter.bump, '{"by": 2}').result == "2"
    instance_tool = Tool(counter, name="counter")
    assert instance_tool.description == "Counts calls."
    assert list(props(instance_tool)) == ["by"]
    part = Tool(functools.partial(add, y=10), name="add10")
    assert part.description == "Add two numbers."
    assert run1(part, '{"x": 1}').result == "11"


def test_a_tool_given_by_name_from_python_says_what_to_pass() -> None:
    # A trial passed nbchat.panel(tools=["python"]), as %%chat --tools python takes.
    with pytest.raises(ToolDefinitionError) as info:
        Tool("python")  # type: ignore[arg-type]
    assert str(info.value) == (
        "a tool must be a callable, got the string 'python' (from Python the python tool "
        "is nbchat.python_tool(); names are for %%chat --tools)"
    )
    with pytest.raises(ToolDefinitionError, match=r"^a tool must be a callable, got int$"):
        Tool(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", [None, "has space", "x" * 65, "", "naïve"])
def test_bad_names_are_rejected(name: str | None) -> None:
    with pytest.raises(ToolDefinitionError, match="is not allowed"):
        Tool(lambda x: x, name=name)


def test_functions_that_cannot_be_described_are_rejected_clearly() -> None:
    def star(*values: int) -> int:
        return sum(values)

    def kw(**options: str) -> str:
        return ""

    class Opaque:
        pass

    def takes_opaque(thing: Opaque) -> None:
        pass

    def gen(n: int):  # type: ignore[no-untyped-def]
        yield n

    with pytest.raises(ToolDefinitionError, match=r"parameter \*values"):
        as_tool(star)
    with pytest.raises(ToolDefinitionError, match=r"parameter \*\*options"):
        as_tool(kw)
    with pytest.raises(ToolDefinitionError, match=r"parameter 'thing' has type .*Opaque"):
        as_tool(takes_opaque)
    with pytest.raises(ToolDefinitionError, match="generator"):
        as_tool(gen)
    with pytest.raises(ToolDefinitionError, match="must be a callable"):
        as_tool(42)  # type: ignore[arg-type]
    with pytest.raises(ToolDefinitionError, match=r"@tool\(name=...\)"):
        tool("weather")  # type: ignore[call-overload]


def test_toolset_membership_specs_and_duplicates() -> None:
    @tool
    def one() -> int:
        """One."""
        return 1

    def two() -> int:
        """Two."""
        return 2

    ts = ToolSet([one, two])
    assert len(ts) == 2 and ts.names() == ["one", "two"]
    assert "one" in ts and one in ts and "three" not in ts
    assert [s["function"]["name"] for s in ts.specs()] == ["one", "two"]
    ts.add(one)  # the same tool again is fine
    with pytest.raises(ToolDefinitionError, match="two tools are named 'one'"):
        ts.add(tool(two, name="one"))
    ts.add(tool(two, name="one"), replace=True)
    assert run(ts, call("one"))[0].result == "2"


# --------------------------------------------------------------------------- calls


def test_models_arrive_as_instances_enums_as_members_and_defaults_stay_the_functions() -> None:
    seen: dict[str, Any] = {}
    marker = object()

    def paint(at: Point, color: Color, note: Any = marker) -> str:
        """Paint a point."""
        seen.update(at=at, color=color, note=note)
        return "ok"

    rec = run1(paint, '{"at": {"x": 1, "y": 2}, "color": "blue"}')
    assert rec.result == "ok" and not rec.is_error
    assert seen == {"at": Point(x=1, y=2), "color": Color.BLUE, "note": marker}
    assert seen["note"] is marker


def test_defaults_given_by_pydantic_field_reach_the_function() -> None:
    def count(n: int = Field(5, description="how many")) -> int:
        """Count."""
        return n

    def limit(n: Annotated[int, Field(default=3, ge=1)]) -> int:
        """Limit."""
        return n

    assert props(as_tool(count))["n"] == {
        "default": 5,
        "description": "how many",
        "type": "integer",
    }
    assert run1(count, "{}").result == "5"
    assert run1(limit, "{}").result == "3"
    assert run1(limit, '{"n": 0}').error_kind == "invalid_arguments"


def test_positional_only_parameters_are_passed_positionally() -> None:
    def span(a: int, b: int = 10, /, *, step: int = 1) -> list[int]:
        """A range."""
        return list(range(a, b, step))

    assert run1(span, '{"a": 7}').result == "[7,8,9]"
    assert run1(span, '{"a": 0, "b": 6, "step": 2}').result == "[0,2,4]"


def test_empty_and_null_arguments_mean_no_arguments() -> None:
    def ping() -> str:
        """Ping."""
        return "pong"

    assert run1(ping, "").result == "pong"
    assert run1(ping, "  ").result == "pong"
    assert run1(ping, "null").result == "pong"

    def needs(city: str) -> str:
        """Needs a city."""
        return city

    rec = run1(needs, "")
    assert rec.error_kind == "invalid_arguments"  # "" is {}, which lacks the required city


def test_invalid_arguments_give_concise_pydantic_errors() -> None:
    def weather(city: str, days: int = 1) -> str:
        """Weather."""
        return city

    rec = run1(weather, '{"city": "Oslo", "days": "many"}')
    assert rec.is_error and rec.error_kind == "invalid_arguments"
    payload = json.loads(rec.result)
    assert payload["ok"] is False and payload["error_kind"] == "invalid_arguments"
    assert "days: Input should be a valid integer" in payload["message"]
    assert "'many'" in payload["message"]
    assert "errors.pydantic.dev" not in payload["message"]

    missing = json.loads(run1(weather, "").result)
    assert missing["error_kind"] == "invalid_arguments"
    assert "city: Field required" in missing["message"]
    assert "Parameters: city, days" in missing["message"]

    extra = json.loads(run1(weather, '{"city": "Oslo", "town": "x"}').result)
    assert "town: Extra inputs are not permitted" in extra["message"]

    not_object = json.loads(run1(weather, '["Oslo"]').result)
    assert not_object["error_kind"] == "invalid_arguments"
    assert "must be a JSON object, got list" in not_object["message"]


def test_malformed_json_is_an_invalid_json_error() -> None:
    def weather(city: str) -> str:
        """Weather."""
        return city

    rec = run1(weather, '{"city": "Os')
    assert rec.is_error and rec.error_kind == "invalid_json"
    assert json.loads(rec.result)["message"].startswith("arguments are not valid JSON")
    assert rec.arguments == '{"city": "Os'


def test_unknown_tool_lists_the_available_ones() -> None:
    def a() -> None:
        """A."""

    def b() -> None:
        """B."""

    rec = run(ToolSet([a, b]), call("c", "{}"))[0]
    assert rec.is_error and rec.error_kind == "unknown_tool"
    message = json.loads(rec.result)["message"]
    assert "'c'" in message and "available tools: a, b" in message


def test_a_raising_tool_becomes_a_tool_error_without_traceback() -> None:
    def explode(n: int) -> int:
        """Fail."""
        raise ZeroDivisionError(f"cannot divide {n} by zero")

    def quit_() -> None:
        """Exit like argparse does."""
        raise SystemExit(2)

    async def explode_async() -> None:
        """Fail asynchronously."""
        raise KeyError("missing")

    ts = ToolSet([explode, tool(quit_, name="quit"), explode_async])
    recs = run(ts, call("explode", '{"n": 3}'), call("quit"), call("explode_async"))
    assert [r.error_kind for r in recs] == ["tool_error"] * 3
    messages = [json.loads(r.result)["message"] for r in recs]
    assert messages == [
        "ZeroDivisionError: cannot divide 3 by zero",
        "SystemExit: 2",
        "KeyError: 'missing'",
    ]
    assert all("Traceback" not in r.result for r in recs)


def test_records_carry_ids_turn_round_and_duration() -> None:
    def echo(text: str) -> str:
        """Echo."""
        return text

    rec = asyncio.run(
        ToolSet([echo]).run([call("echo", '{"text": "hi"}', id="call_9")], turn_id="t1", round=2)
    )[0]
    assert (rec.call_id, rec.name, rec.result, rec.turn_id, rec.round) == (
        "call_9",
        "echo",
        "hi",
        "t1",
        2,
    )
    assert rec.duration_ms > 0 and rec.error_kind is None
    assert asyncio.run(ToolSet().run([])) == []


# --------------------------------------------------------------------------- concurrency


def test_sync_tools_run_concurrently_and_results_keep_call_order() -> None:
    # Each waits for the other two: they pass only if all three run at once (a
    # rendezvous, not a stopwatch, so a loaded machine cannot fail it).
    together = threading.Barrier(3, timeout=10)

    def nap(seconds: float, label: str) -> str:
        """Sleep, then answer."""
        together.wait()
        time.sleep(seconds)
        return label

    ts = ToolSet([nap])
    calls = [
        call("nap", json.dumps({"seconds": 0.3 - i * 0.1, "label": f"n{i}"})) for i in range(3)
    ]
    recs = run(ts, *calls)
    assert [r.result for r in recs] == ["n0", "n1", "n2"]  # call order, not finishing order
    assert not any(r.is_error for r in recs), [r.result for r in recs]


def test_three_sync_tools_run_at_once_on_threads_named_after_the_tool() -> None:
    together = threading.Barrier(3, timeout=10)

    def nap() -> str:
        """Sleep."""
        together.wait()
        return threading.current_thread().name

    recs = run(ToolSet([nap]), *(call("nap", id=str(i)) for i in range(3)))
    names = [r.result for r in recs]
    assert all(name.startswith("nbchat-tool-nap") for name in names), names


def test_async_tools_run_concurrently_on_the_running_loop() -> None:
    async def main() -> list[ToolCallRecord]:
        together = asyncio.Barrier(3)
        loops: set[int] = set()

        async def nap(label: str) -> str:
            """Wait for the others."""
            loops.add(id(asyncio.get_running_loop()))
            async with asyncio.timeout(10):
                await together.wait()
            return label

        ts = ToolSet([nap])
        recs = await ts.run([call("nap", json.dumps({"label": str(i)})) for i in range(3)])
        assert loops == {id(asyncio.get_running_loop())}  # on this loop, not a thread's
        return recs

    recs = asyncio.run(main())
    assert [r.result for r in recs] == ["0", "1", "2"]
    assert not any(r.is_error for r in recs), [r.result for r in recs]


def test_cancelling_run_returns_at_once_and_cancels_async_tools() -> None:
    release = threading.Event()
    cancelled: list[str] = []

    def stuck() -> str:
        """Block until released."""
        release.wait(5)
        return "late"

    async def slow() -> str:
        """Sleep long."""
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            cancelled.append("slow")
            raise
        return "late"

    async def main() -> float:
        ts = ToolSet([stuck, slow])
        task = asyncio.create_task(ts.run([call("stuck", id="1"), call("slow", id="2")]))
        await asyncio.sleep(0.1)
        task.cancel()
        start = time.perf_counter()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - start

    try:
        assert asyncio.run(main()) < 2.5  # not the 5 s the stuck tool would take
    finally:
        release.set()  # let the abandoned thread finish
    assert cancelled == ["slow"]


# --------------------------------------------------------------------------- results


def test_serialise_scalars_containers_and_models() -> None:
    class Unjsonable:
        def __repr__(self) -> str:
            return "<Unjsonable>"

    assert serialise_result("plain text", 100) == "plain text"
    assert serialise_result(Point(x=1), 100) == '{"x":1,"y":0}'
    assert serialise_result({"a": [1, 2.5, None, True]}, 100) == '{"a":[1,2.5,null,true]}'
    assert serialise_result([1, "é"], 100) == '[1,"é"]'
    assert serialise_result(3, 100) == "3"
    assert serialise_result(False, 100) == "false"
    assert serialise_result(None, 100) == "null"
    assert serialise_result({"x": Unjsonable()}, 100) == '{"x":"<Unjsonable>"}'
    assert serialise_result(Unjsonable(), 100) == "<Unjsonable>"
    assert serialise_result(Color.RED, 100) == "<Color.RED: 'red'>"


def test_serialise_numpy_values_as_json() -> None:
    np = pytest.importorskip("numpy")
    assert serialise_result(np.int64(7), 100) == "7"
    assert serialise_result({"v": np.arange(3)}, 100) == '{"v":[0,1,2]}'


def test_nan_and_infinities_reach_the_model_as_valid_json() -> None:
    """A NaN was sent as the bare word NaN, which JSON (and the model's parser) refuses."""
    np = pytest.importorskip("numpy")
    values = {"f": float("nan"), "g": [float("inf"), 1.5], "a": np.array([1.0, np.nan])}
    values["s"] = np.float64("nan")
    text = serialise_result(values, 200)

    def refuse(word: str) -> None:
        raise AssertionError(f"{word} is not JSON: {text}")

    assert json.loads(text, parse_constant=refuse) == {
        "f": None,
        "g": [None, 1.5],
        "a": [1.0, None],
        "s": None,
    }


def test_serialise_dataframe_shows_shape_and_first_ten_rows() -> None:
    df = pd.DataFrame({"n": range(25), "sq": [i * i for i in range(25)]})
    text = serialise_result(df, 10_000)
    first, *rows = text.splitlines()
    assert first == "DataFrame with shape (25, 2) (first 10 rows):"
    assert rows == df.head(10).to_string().splitlines()

    small = serialise_result(pd.DataFrame({"a": [1]}), 10_000)
    assert small.splitlines()[0] == "DataFrame with shape (1, 1):"


def test_serialise_series() -> None:
    s = pd.Series([0.5, 1.5], name="price")
    text = serialise_result(s, 1000)
    assert text.splitlines()[0] == "Series 'price' with shape (2,):"
    assert text.splitlines()[1:] == s.to_string().splitlines()


def test_truncation_keeps_max_chars_and_says_so() -> None:
    text = serialise_result("x" * 50_000, 12_345)
    kept, marker = text.rsplit("\n", 1)
    assert kept == "x" * 12_345
    assert marker == "... [truncated: 12345 of 50000 characters shown]"
    assert len(text) <= 12_345 + len(marker) + 1
    assert serialise_result("short", 5) == "short"

    def big() -> list[int]:
        """A long list."""
        return list(range(10_000))

    rec = asyncio.run(ToolSet([big], max_result_chars=100).run([call("big")]))[0]
    assert rec.result.endswith("characters shown]") and not rec.is_error
    assert rec.result.startswith("[0,1,2,3")


def test_error_payload_is_json() -> None:
    assert json.loads(error_payload("tool_error", "boom")) == {
        "ok": False,
        "error_kind": "tool_error",
        "message": "boom",
    }


def test_importing_the_tools_module_stays_light() -> None:
    code = (
        "import nbchat._tools, sys; "
        "heavy = [m for m in ('pandas', 'openai', 'duckdb', 'numpy') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
