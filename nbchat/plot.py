"""Charts of the store, as matplotlib ``Axes``: ``costs``, ``tokens``, ``latency``, ``context``.

``nbchat.plot.costs(by="model")`` and ``from nbchat.plot import costs`` are the same
function. Each chart takes ``db=``, ``since=`` / ``until=`` and ``ax=``; an unknown
price is never drawn as 0. The charts themselves are in ``nbchat._plot``.
"""

from ._plot import context, costs, latency, tokens

__all__ = ["context", "costs", "latency", "tokens"]
