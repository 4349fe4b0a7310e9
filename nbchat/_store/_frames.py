"""Query results, and how they become pandas DataFrames with nbchat's dtypes.

A result holds its rows as an Arrow table when pyarrow is installed and every column has
a type read from Arrow here (text, numbers, booleans, days, timestamps), else as numpy
columns (masked where NULL). Both make the same frame: timezone-aware UTC timestamps,
nullable integers, floats with NaN, pandas' text dtype, JSON columns parsed. From Arrow,
text stays Arrow (pandas' own strings are Arrow strings): no Python string is made per
value, which was most of the time of a 10k-row frame.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["QueryResult", "arrow_readable", "in_order", "to_frame"]


@dataclass(frozen=True)
class QueryResult:
    """Rows of a query with DuckDB's type names: numpy columns (masked where NULL) in
    ``data``, or an Arrow table in ``table`` (see ``arrow_readable``)."""

    columns: list[str]
    types: list[str]
    data: dict[str, Any] = field(default_factory=dict)
    table: Any = None


_INTEGER_TYPES = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER"}
)
_FLOAT_TYPES = frozenset({"FLOAT", "DOUBLE", "HUGEINT", "UBIGINT", "UHUGEINT"})
_TEXT_TYPES = frozenset({"VARCHAR", "JSON", "UUID"})


@cache
def _pyarrow_installed() -> bool:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        return False
    return True


def arrow_readable(types: Sequence[str]) -> bool:
    """Whether rows of these DuckDB types are best fetched as Arrow (pyarrow installed, and
    every type one ``to_frame`` reads from Arrow; lists, structs, blobs... are not)."""
    if not _pyarrow_installed():
        return False
    for name in types:
        kind = name.upper()
        if not (
            kind in _INTEGER_TYPES
            or kind in _FLOAT_TYPES
            or kind in _TEXT_TYPES
            or kind in ("BOOLEAN", "DATE")
            or kind.startswith(("TIMESTAMP", "DECIMAL"))
        ):
            return False
    return True


@cache
def _text_dtype() -> Any:
    import pandas as pd

    # pandas 3 has a real string dtype ("str", NaN for missing); older pandas uses object.
    # Resolved once: looking a dtype up by name walks pandas' registry every time.
    return pd.api.types.pandas_dtype("str" if int(pd.__version__.split(".")[0]) >= 3 else object)


def _objects(items: list[Any]) -> Any:
    """An object array of ``items`` (each one value, even a list)."""
    import numpy as np

    # fromiter takes each item as it is; assigning a list into an array looks into every
    # item for a sequence to broadcast (~6x slower on 10k rows).
    return np.fromiter(items, dtype=object, count=len(items))


def _column(values: Any, type_name: str) -> Any:
    """One numpy result column as the array of a DataFrame column of the matching dtype."""
    import numpy as np
    import pandas as pd

    mask = np.ma.getmaskarray(values)
    data = np.ma.getdata(values)
    nulls = bool(mask.any())
    kind = type_name.upper()
    if kind == "DATE":  # a calendar day, not a midnight timestamp
        days = data.astype("datetime64[D]").tolist()
        return np.array([None if m else d for d, m in zip(days, mask, strict=True)] or [], object)
    if kind.startswith("TIMESTAMP"):
        stamps = data.astype("datetime64[us]", copy=True)
        stamps[mask] = np.datetime64("NaT")
        if kind == "TIMESTAMP WITH TIME ZONE":
            return pd.DatetimeIndex(stamps).tz_localize("UTC").array
        return stamps
    if kind in _INTEGER_TYPES:
        return pd.arrays.IntegerArray(data.astype("int64"), mask.copy())
    if kind in _FLOAT_TYPES or kind.startswith("DECIMAL"):
        floats = data.astype("float64", copy=True)
        floats[mask] = np.nan
        return floats
    if kind == "BOOLEAN":
        return pd.arrays.BooleanArray(data.astype(bool), mask.copy())
    # Objects (strings, lists...) with None where NULL, without a Python loop.
    items: Any = np.array(data, dtype=object, copy=True)
    if nulls:
        items[mask] = None
    if kind in _TEXT_TYPES:
        return pd.array(items, dtype=_text_dtype())
    return items


def _arrow_column(values: Any, type_name: str) -> Any:
    """One Arrow result column (a ``ChunkedArray``) as the array of a DataFrame column: the
    same dtype ``_column`` gives."""
    import pandas as pd
    import pyarrow as pa

    def writable(array: Any) -> Any:  # Arrow hands out read-only views when it can
        return array if array.flags.writeable else array.copy()

    kind = type_name.upper()
    if kind == "DATE":
        return _objects(values.to_pylist())
    if kind.startswith("TIMESTAMP"):
        # Without its zone an Arrow timestamp keeps its UTC value; any unit becomes µs.
        stamps = writable(
            values.cast(pa.timestamp("us"), safe=False).to_numpy(zero_copy_only=False)
        )
        if kind == "TIMESTAMP WITH TIME ZONE":
            return pd.DatetimeIndex(stamps).tz_localize("UTC").array
        return stamps
    if kind in _INTEGER_TYPES:
        return _from_arrow(pd.Int64Dtype(), values.cast(pa.int64()))
    if kind in _FLOAT_TYPES or kind.startswith("DECIMAL"):
        return writable(values.cast(pa.float64(), safe=False).to_numpy(zero_copy_only=False))
    if kind == "BOOLEAN":
        return _from_arrow(pd.BooleanDtype(), values)
    text = _text_dtype()
    if isinstance(text, pd.StringDtype) and text.storage == "pyarrow":
        return _from_arrow(text, values)
    return _objects(values.to_pylist())


def _from_arrow(dtype: Any, values: Any) -> Any:
    # pandas' protocol for extension arrays made from Arrow (what pyarrow's to_pandas calls).
    return dtype.__from_arrow__(values)


def in_order(result: QueryResult, keys: Sequence[str]) -> QueryResult:
    """``result`` with its rows sorted by ``keys`` (ascending, stable; no key is NULL)."""
    if not keys:
        return result
    if result.table is not None:
        import pyarrow.compute as pc

        order = pc.sort_indices(result.table, sort_keys=[(key, "ascending") for key in keys])
        return QueryResult(result.columns, result.types, table=result.table.take(order))
    import numpy as np

    values = [np.ma.getdata(result.data[key]).tolist() for key in keys]
    rows = sorted(range(len(values[0])), key=lambda i: tuple(column[i] for column in values))
    data = {name: column[rows] for name, column in result.data.items()}
    return QueryResult(result.columns, result.types, data=data)


def to_frame(
    result: QueryResult,
    json_columns: frozenset[str] = frozenset(),
    order_by: Sequence[str] = (),
) -> pd.DataFrame:
    """A DataFrame of ``result``; ``json_columns`` are parsed into Python objects, and
    the rows are put in order by ``order_by`` (see ``in_order``)."""
    import numpy as np
    import pandas as pd

    result = in_order(result, order_by)

    parse: Callable[[str], Any] = json.loads
    arrow = result.table is not None
    columns: dict[str, Any] = {}
    for name, kind in zip(result.columns, result.types, strict=True):
        values = result.table.column(name) if arrow else result.data[name]
        if name in json_columns:
            if arrow:
                texts = values.to_pylist()
                parsed = [None if t is None else parse(t) for t in texts]
            else:
                mask = np.ma.getmaskarray(values).tolist()
                texts = np.ma.getdata(values).tolist()
                parsed = [None if m else parse(t) for t, m in zip(texts, mask, strict=True)]
            columns[name] = _objects(parsed)  # a list of lists stays one column
        else:
            columns[name] = _arrow_column(values, kind) if arrow else _column(values, kind)
    # Arrays, not Series: no index to align, and nothing copied again (~3 ms on 10k rows).
    if arrow:
        rows = result.table.num_rows
    else:
        rows = len(next(iter(result.data.values()))) if result.data else 0
    return pd.DataFrame(columns, index=pd.RangeIndex(rows), columns=result.columns, copy=False)
