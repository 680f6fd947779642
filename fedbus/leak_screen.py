"""Columns that would leak the outcome into a clinical model, found before an experiment is written.

``fedbus config new`` runs on the machine that holds the file; it reads values here and
writes only the verdicts (a column name and why), never a value. Three kinds of leak:

- **follow-up / time-to-event durations** (by name): a patient who dies is followed up for
  a short time, so the follow-up length predicts death, yet it is unknown at admission
  (the heart-failure records' ``time``);
- **identifiers**: id-like names, or integer columns that number the rows (unique per row,
  consecutive): a model learns the export order, not the patient;
- **near-perfect single-column separators** (binary targets): a column whose values alone
  rank the classes with AUC >= ``SEPARATION_AUC`` is almost surely recorded after, or from,
  the outcome (a discharge code, a cause of death).

Every verdict can be overridden (``--keep COLUMN``): the operator knows the data.
"""

from __future__ import annotations

import re

import pandas as pd

SEPARATION_AUC = 0.95  # one column alone ranks the classes this well: a leak, not a predictor
# Tokens of a column name (split on anything not a letter or digit, and on camelCase).
_DURATION_TOKENS = frozenset({"time", "duration", "survival", "followup", "fu", "tte", "los", "futime"})
_DURATION_PHRASES = ("follow_up", "followup", "days_to_", "time_to_", "months_to_", "years_to_", "length_of_stay")
_ID_TOKENS = frozenset({"id", "ids", "mrn", "uuid", "guid", "ssn", "patientid", "recordid", "subjectid"})


def _tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def _norm(name: str) -> str:
    return "_".join(_tokens(name)) + "_"


def duration_reason(name: str) -> str | None:
    """Why NAME reads as a follow-up / time-to-event duration, or None."""
    norm = _norm(name)
    if set(_tokens(name)) & _DURATION_TOKENS or any(p in norm for p in _DURATION_PHRASES):
        return ("a follow-up / time-to-event duration by its name: known only after the outcome, "
                "it leaks it")
    return None


def identifier_reason(name: str, values: pd.Series | None) -> str | None:
    """Why a column is an identifier (by name, or integers that number the rows), or None."""
    if set(_tokens(name)) & _ID_TOKENS:
        return "an identifier by its name: it names the patient or record, not a finding"
    if values is None:
        return None
    v = values.dropna()
    if len(v) < 3 or len(v) != len(values) or not v.is_unique:
        return None
    if not ((v % 1) == 0).all():
        return None
    if float(v.max() - v.min()) == float(len(v) - 1):
        return "an identifier: integers unique per row that number the rows"
    return None


def single_column_auc(values: pd.Series, positive: pd.Series) -> float | None:
    """How well one column alone ranks the classes (max(AUC, 1 - AUC), Mann-Whitney), or None."""
    keep = values.notna() & positive.notna()
    x, y = values[keep].astype(float), positive[keep].astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = x.rank(method="average")
    auc = (float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return max(auc, 1.0 - auc)


def separation_reason(values: pd.Series, positive: pd.Series) -> str | None:
    """Why one numeric column separates a binary target almost perfectly, or None."""
    auc = single_column_auc(values, positive)
    if auc is None or auc < SEPARATION_AUC:
        return None
    return (f"alone it separates the target almost perfectly (single-column AUC >= {SEPARATION_AUC:g}): "
            "likely recorded after, or from, the outcome")


def screen(df: pd.DataFrame, *, target: str, numeric: list[str], positive: pd.Series | None,
           keep: tuple[str, ...] = ()) -> dict[str, str]:
    """column -> why it leaks, for every column but the target and those in KEEP.

    ``numeric``: the columns read as numbers (parsed with the site's own parser);
    ``positive``: the binary target as booleans (None for other tasks: no separation check)."""
    from site_worker.data import DataError, to_numeric

    out: dict[str, str] = {}
    for col in df.columns:
        if col == target or col in keep:
            continue
        name = str(col)
        why = duration_reason(name)
        if why is None:
            values: pd.Series | None = None
            if col in numeric:
                try:
                    values = to_numeric(df[col], name)
                except DataError:
                    values = None
            why = identifier_reason(name, values)
            if why is None and values is not None and positive is not None:
                why = separation_reason(values, positive)
        if why is not None:
            out[name] = why
    return out
