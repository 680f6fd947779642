"""Hypothesis strategies for every wire message, derived from ``protocol/bounds.py``.

``payload(cls)`` draws a message of type ``cls`` with every field inside its bound;
``broken(cls)`` draws one with exactly one field outside it (wrong type, non-finite,
negative or huge, over-long, unknown key ...). Both read the message registry
(``MESSAGE_TYPES``) and ``bounds.FIELDS``, so a type or field added later is drawn
without touching this file.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from hypothesis import strategies as st

from protocol import bounds as B
from protocol.messages import MESSAGE_TYPES, DatasetInfo

SMALL = 6  # items drawn per container: the bounds allow more, the fuzz needs few

tensors = st.lists(
    st.tuples(st.text(max_size=12), st.lists(st.floats(-10, 10, width=32), max_size=6)
              .map(lambda v: np.asarray(v, dtype=np.float32))),
    max_size=3,
).map(tuple)

json_leaf = (st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=10))
json_like = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=4)
                         | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)


def within(bound: B.Bound, *, field: str = "") -> st.SearchStrategy[Any]:
    """Values inside ``bound``."""
    if isinstance(bound, B.Int):
        return st.integers(bound.lo, bound.hi)
    if isinstance(bound, B.Num):
        return st.floats(bound.lo, bound.hi, exclude_min=bound.open_lo, exclude_max=bound.open_hi,
                         allow_nan=False, allow_infinity=False)
    if isinstance(bound, B.Text):
        if bound.choices:
            return st.sampled_from(bound.choices)
        if bound.pattern:
            return st.from_regex(bound.pattern, fullmatch=True)
        return st.text(min_size=bound.min_len, max_size=min(bound.max_len, 24))
    if isinstance(bound, B.Flag):
        return st.booleans()
    if isinstance(bound, B.Bin):
        return st.binary(min_size=bound.min_len, max_size=min(bound.max_len, max(bound.min_len, 24)))
    if isinstance(bound, B.Opt):
        return st.none() | within(bound.inner)
    if isinstance(bound, B.Items):
        return st.lists(within(bound.item, field=field), max_size=min(bound.max_items, SMALL))
    if isinstance(bound, B.Table):
        named = {k: within(v) for k, v in bound.named.items()}
        fixed = st.fixed_dictionaries({}, optional=named)
        if bound.other is None:
            return fixed
        key = st.text(min_size=1, max_size=min(bound.key_len, 12)).filter(lambda k: k not in bound.named)
        extra = st.dictionaries(key, within(bound.other), max_size=3)
        return st.tuples(fixed, extra).map(lambda p: {**p[1], **p[0]})
    if isinstance(bound, B.Tree):
        if bound.max_depth <= 1:
            return json_leaf | st.lists(json_leaf, max_size=4)
        return st.dictionaries(st.text(max_size=8), json_like, max_size=5)
    if isinstance(bound, B.Record):
        return st.builds(bound.cls, **{k: within(v) for k, v in bound.fields().items()})
    if isinstance(bound, B.Unchecked):
        if field in ("weights", "masked", "shares", "sealed", "share", "union_masked", "union_shares"):  # Tensors (secure aggregation's too)
            return tensors
        if field == "datasets":
            return payload(DatasetInfo)
    raise AssertionError(f"no strategy for {bound!r} ({field})")


def outside(bound: B.Bound) -> st.SearchStrategy[Any] | None:
    """Values outside ``bound`` (None when every value is inside)."""
    wrong_type = st.sampled_from([[1], {"k": 1}, "x"])
    if isinstance(bound, B.Int):
        out = []
        if bound.lo > -(2**63):
            out.append(st.integers(-(2**63), bound.lo - 1))
        if bound.hi < 2**63 - 1:
            out.append(st.integers(bound.hi + 1, 2**63 - 1))
        return st.one_of(*out, wrong_type, st.just(1.5))
    if isinstance(bound, B.Num):
        bad = [st.sampled_from([math.nan, math.inf, -math.inf]), wrong_type]
        if bound.lo > -1e300:
            bad.append(st.floats(-1e308, bound.lo, exclude_max=not bound.open_lo, allow_nan=False,
                                 allow_infinity=False))
        if bound.hi < 1e300:
            bad.append(st.floats(bound.hi, 1e308, exclude_min=not bound.open_hi, allow_nan=False,
                                 allow_infinity=False))
        return st.one_of(*bad)
    if isinstance(bound, B.Text):
        bad = [st.just("x" * (bound.max_len + 1)), st.sampled_from([3, [1], None])]
        if bound.choices or bound.pattern:
            bad.append(st.just("not-" + "x" * max(0, bound.min_len)))
        return st.one_of(*bad)
    if isinstance(bound, B.Flag):
        return st.sampled_from([1, "true", None])
    if isinstance(bound, B.Bin):
        bad = [st.just(b"x" * (bound.max_len + 1)) if bound.max_len <= 4096 else st.sampled_from([3, None]),
               st.sampled_from([3, None, [1]])]
        if bound.min_len:
            bad.append(st.just(b"x" * (bound.min_len - 1)))
        return st.one_of(*bad)
    if isinstance(bound, B.Opt):
        return outside(bound.inner)
    if isinstance(bound, B.Items):
        inner = outside(bound.item)
        bad = [st.just({"not": "a list"})]
        if inner is not None:
            bad.append(inner.map(lambda v: (v,)))
        if bound.max_items <= 4096:
            bad.append(st.just(tuple(range(bound.max_items + 1))))
        return st.one_of(*bad)
    if isinstance(bound, B.Table):
        bad = [st.just(["not", "a map"])]
        for k, v in bound.named.items():
            o = outside(v)
            if o is not None:
                bad.append(o.map(lambda x, k=k: {k: x}))
        if bound.other is None:
            bad.append(st.just({"unknown_key": 1}))
        else:
            o = outside(bound.other)
            if o is not None:
                bad.append(o.map(lambda x: {"zz_other": x}))
        if bound.max_items <= 4096:
            bad.append(st.just({f"k{i}": 1.0 for i in range(bound.max_items + 1)}))
        return st.one_of(*bad)
    if isinstance(bound, B.Tree):
        deep: Any = 1
        for _ in range(bound.max_depth + 2):
            deep = [deep]
        return st.sampled_from([{"x": math.nan}, {"x": -math.inf}, {"deep": deep}, {"s": "x" * (bound.max_str + 1)}])
    return None


def payload(cls: type, **overrides: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A ``cls`` with every field inside its bound (``overrides``: strategies for some fields)."""
    fields = B.FIELDS[cls.__name__]
    kw = {}
    for f in dataclasses.fields(cls):
        s = overrides[f.name] if f.name in overrides else within(fields[f.name], field=f.name)
        kw[f.name] = s.map(tuple) if isinstance(fields[f.name], B.Items) else s
    return st.builds(cls, **kw)


def breakable(cls: type) -> list[str]:
    """Fields of ``cls`` that have values outside their bound."""
    return [f for f, b in B.FIELDS[cls.__name__].items() if outside(b) is not None]


def broken(cls: type) -> st.SearchStrategy[tuple[Any, str]]:
    """``(message, field)``: a ``cls`` whose ``field`` alone is outside its bound."""
    def one(field: str) -> st.SearchStrategy[tuple[Any, str]]:
        return st.tuples(payload(cls), outside(B.FIELDS[cls.__name__][field])).map(  # type: ignore[arg-type]
            lambda p: (dataclasses.replace(p[0], **{field: p[1]}), field))
    return st.sampled_from(breakable(cls)).flatmap(one)


MESSAGE_CLASSES = list(MESSAGE_TYPES.values())
