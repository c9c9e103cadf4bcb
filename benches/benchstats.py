"""Helpers shared by the summaries the benchmark scripts print (imported from
their python3 heredocs; lib.sh puts benches/ on PYTHONPATH)."""

import re
import statistics


def num(v):
    """A float, or None for an empty or non-numeric field."""
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def med(values):
    """The median of the values that are not None (None when there are none)."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    """`v` formatted with `spec`, or "n/a"."""
    return format(v, spec) if v is not None else "n/a"


def wrk_ms(value, source):
    """A wrk latency (812.00us, 1.23ms, 2.01s, 1.00m) in milliseconds; `source`
    names the output file in the error."""
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", value)
    if not m:
        raise SystemExit(f"cannot parse wrk latency {value!r} in {source}")
    return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[m.group(2)]


def pct(values, p):
    """The p-th percentile of the values that are not None, nearest rank (the
    smallest value with at least p % of them at or below it); None when there
    are none."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    rank = -(-len(values) * p // 100)  # ceil(n * p / 100)
    return values[int(max(1, min(len(values), rank))) - 1]
