"""Just enough PromQL reading to check queries against the metrics tickd exposes.

Not a parser: a tokenizer that knows where a metric name can stand. It finds the vector
selectors of an expression (`name{matchers}`, or `{__name__="name", …}`) and leaves out
functions and aggregations (`rate(`, `sum by (…) (`), label names (inside `{…}` and in
`by`/`without`/`on`/`ignoring`/`group_left`/`group_right` lists), keywords, numbers, durations,
strings and Grafana variables (`$__rate_interval`, `${queue}`). Names are kept as written:
`x_bucket` stays `x_bucket`.
"""

import re

# Each alternative is one token; the order matters (a duration before a number, a number
# before an identifier).
_TOKEN = re.compile(
    r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+\b)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>[{}()\[\],]|[^\s\w{}()\[\],"'`$]+)
    """,
    re.VERBOSE,
)

# Followed by a parenthesised list of label names.
_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
# Never metric names where a metric could stand.
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
# Aggregations, which may put `by (…)`/`without (…)` before their parenthesis.
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}


def _tokens(expr):
    pos = 0
    out = []
    while pos < len(expr):
        m = _TOKEN.match(expr, pos)
        if not m:
            raise ValueError(f"cannot read PromQL at {expr[pos:pos + 20]!r}")
        pos = m.end()
        if m.lastgroup != "space":
            out.append((m.lastgroup, m.group()))
    return out


def _check_balanced(tokens):
    pairs = {")": "(", "]": "[", "}": "{"}
    stack = []
    for kind, value in tokens:
        if kind != "punct":
            continue
        if value in "([{":
            stack.append(value)
        elif value in pairs and (not stack or stack.pop() != pairs[value]):
            raise ValueError(f"unbalanced {value!r}")
    if stack:
        raise ValueError(f"unclosed {stack[-1]!r}")


def _closing(tokens, i, open_, close):
    """Index of the token closing the bracket opened at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        if tokens[j] == ("punct", open_):
            depth += 1
        elif tokens[j] == ("punct", close):
            depth -= 1
            if depth == 0:
                return j
    raise ValueError(f"unbalanced {open_!r}")


def _matchers(tokens):
    """The matchers of a `{…}` body as text, and the name an `__name__="x"` matcher sets."""
    text = " ".join(value for _, value in tokens)
    name = None
    for k, (kind, value) in enumerate(tokens[:-2]):
        if (kind, value) == ("ident", "__name__") and tokens[k + 1] == ("punct", "="):
            if tokens[k + 2][0] == "string":
                name = tokens[k + 2][1][1:-1]
    return text, name


def selectors(expr):
    """The vector selectors of `expr`, in order: a list of (metric name, matchers text),
    the text being the `{…}` body with tokens joined by single spaces ('' if none)."""
    tokens = _tokens(expr)
    _check_balanced(tokens)
    found = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        following = tokens[i + 1] if i + 1 < len(tokens) else (None, None)
        if kind == "ident" and value in _LABEL_LIST:
            # Skip the label list, if any: `by (a, b)`; `group_left` may stand alone.
            if following == ("punct", "("):
                i = _closing(tokens, i + 1, "(", ")") + 1
            else:
                i += 1
            continue
        if kind == "ident" and (value.lower() in _KEYWORDS or following == ("punct", "(")):
            i += 1
            continue
        if kind == "ident" and value in _AGGREGATIONS and following[1] in ("by", "without"):
            i += 1
            continue
        if kind == "ident":
            matchers = ""
            if following == ("punct", "{"):
                end = _closing(tokens, i + 1, "{", "}")
                matchers, _ = _matchers(tokens[i + 2:end])
                i = end
            found.append((value, matchers))
            i += 1
            continue
        if (kind, value) == ("punct", "{"):
            # A selector without a name in front: `{__name__="x", …}`.
            end = _closing(tokens, i, "{", "}")
            matchers, name = _matchers(tokens[i + 1:end])
            if name:
                found.append((name, matchers))
            i = end + 1
            continue
        if (kind, value) == ("punct", "["):
            # A range or subquery: `[5m]`, `[$__rate_interval]`, `[1h:5m]`.
            i = _closing(tokens, i, "[", "]") + 1
            continue
        i += 1
    return found


def metric_names(expr):
    """The metric names `expr` selects, as written (`x_bucket` is not shortened to `x`)."""
    return {name for name, _ in selectors(expr)}
