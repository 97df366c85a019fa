#!/usr/bin/env python3
"""Writes tests/dst/occurrences.json: cron schedules' occurrences over a year in zones whose
clocks change, under every DST policy, computed without tickd: croniter walks wall-clock
times, zoneinfo says which instants each one names, and the policy is applied as the README
states it. tests/dst.rs checks tickd against the file.

To regenerate (the tzdata release must be the one chrono-tz embeds; tests/dst.rs checks it):
    python3 -m venv /tmp/v && /tmp/v/bin/pip install croniter tzdata==2025.2
    /tmp/v/bin/python tests/dst/generate.py
"""
import datetime as dt
import json
import pathlib

import tzdata
from croniter import croniter
from zoneinfo import ZoneInfo

UTC = dt.timezone.utc
MODULUS = 2**61 - 1

ZONES = [
    ("Europe/Berlin", "2026-01-01", "2027-01-01"),
    ("America/New_York", "2026-01-01", "2027-01-01"),
    # Clocks move by 30 minutes.
    ("Australia/Lord_Howe", "2026-01-01", "2027-01-01"),
    # Clocks change at midnight.
    ("America/Santiago", "2026-01-01", "2027-01-01"),
    # Skipped 2011-12-30 entirely, and had DST that year.
    ("Pacific/Apia", "2011-07-01", "2012-07-01"),
]
EXPRESSIONS = [
    "30 2 * * *",
    "0 0 * * *",
    "0 * * * *",
    "*/20 1-3 * * *",
    "15 1 * * 0",
    "30 0 2 * * *",
]
GAPS = ["auto", "shift", "skip"]
REPEATS = ["auto", "first", "last", "both"]


def fields(expression):
    f = expression.split()
    return f if len(f) == 6 else ["0"] + f


def fixed_time(expression):
    """One second, one minute and one hour: cron's (and croner's) "fixed-time job"."""
    return all(x.isdigit() for x in fields(expression)[:3])


def for_croniter(expression):
    f = expression.split()
    # croniter takes seconds as the last of six fields; tickd as the first.
    return " ".join(f[1:] + f[:1]) if len(f) == 6 else expression


def resolve(naive, zone):
    """('single', t), ('repeat', first, second) or ('gap',) for a wall-clock time."""
    a = naive.replace(tzinfo=zone, fold=0).astimezone(UTC)
    b = naive.replace(tzinfo=zone, fold=1).astimezone(UTC)
    back_a = a.astimezone(zone).replace(tzinfo=None)
    back_b = b.astimezone(zone).replace(tzinfo=None)
    if back_a == naive and back_b == naive:
        return ("single", a) if a == b else ("repeat", min(a, b), max(a, b))
    return ("gap",)


def gap_end(naive, zone):
    """The first instant after the gap holding `naive`: found minute by minute."""
    t = naive.replace(second=0, microsecond=0)
    for _ in range(3 * 24 * 60):
        t += dt.timedelta(minutes=1)
        r = resolve(t, zone)
        if r[0] != "gap":
            return r[1]
    raise RuntimeError(f"no end to the gap at {naive}")


def changes(zone, start, end):
    """Instants (seconds) at which the zone's offset changes in [start, end)."""
    out, t = [], start
    last = t.astimezone(zone).utcoffset()
    while t < end:
        t += dt.timedelta(hours=1)
        off = t.astimezone(zone).utcoffset()
        if off != last:
            out.append(int(t.timestamp()))
            last = off
    return out


def main():
    cases = []
    for zone_name, start_s, end_s in ZONES:
        zone = ZoneInfo(zone_name)
        start = dt.datetime.fromisoformat(start_s).replace(tzinfo=UTC)
        end = dt.datetime.fromisoformat(end_s).replace(tzinfo=UTC)
        near = changes(zone, start, end)
        for expression in EXPRESSIONS:
            walk = croniter(for_croniter(expression), start.replace(tzinfo=None) - dt.timedelta(days=2))
            slots = []
            while True:
                n = walk.get_next(dt.datetime)
                if n > end.replace(tzinfo=None) + dt.timedelta(days=2):
                    break
                slots.append((n, resolve(n, zone)))
            fixed = fixed_time(expression)
            for gap in GAPS:
                for repeat in REPEATS:
                    shift = gap == "shift" or (gap == "auto" and fixed)
                    r = repeat if repeat != "auto" else ("first" if fixed else "both")
                    released = set()
                    for n, res in slots:
                        if res[0] == "single":
                            released.add(res[1])
                        elif res[0] == "repeat":
                            if r in ("first", "both"):
                                released.add(res[1])
                            if r in ("last", "both"):
                                released.add(res[2])
                        elif shift:
                            released.add(gap_end(n, zone))
                    times = sorted(int(t.timestamp()) for t in released if start <= t < end)
                    digest = 0
                    for t in times:
                        digest = (digest * 1_000_003 + t) % MODULUS
                    cases.append({
                        "expression": expression,
                        "time_zone": zone_name,
                        "gap": gap,
                        "repeat": repeat,
                        "from": int(start.timestamp()),
                        "to": int(end.timestamp()),
                        "count": len(times),
                        "digest": digest,
                        "changes": near,
                        "near_changes": [t for t in times if any(abs(t - c) <= 36 * 3600 for c in near)],
                    })
    out = pathlib.Path(__file__).with_name("occurrences.json")
    out.write_text(json.dumps({"tzdb": tzdata.IANA_VERSION, "cases": cases}, separators=(",", ":")) + "\n")
    print(f"{len(cases)} cases written to {out}")


if __name__ == "__main__":
    main()
