"""Breaking valid log records at random, for the property tests that hold a fast path to the plain one."""

import json

from hypothesis import strategies as st

# The keys a record is given when it is broken: every key the format defines.
KNOWN_KEYS = ["feedback", "corrects", "persona", "timestamp", "metadata", "rating", "id", "role", "content",
              "edited_content", "comment", "type"]


def places(obj, path=()):
    """Every place in `obj` a value can be set: existing keys and items, and new known keys."""
    if isinstance(obj, dict):
        for key in list(obj) + KNOWN_KEYS:
            yield path + (key,)
        for key, value in obj.items():
            yield from places(value, path + (key,))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield path + (i,)
            yield from places(value, path + (i,))


def break_record(draw, record: dict, values: list, times: int) -> dict:
    """`record` (a JSON copy) with `times` places drawn from `places` set to one of `values`, or
    (one time in five, in an object) their key removed."""
    record = json.loads(json.dumps(record))
    for _ in range(times):
        path = draw(st.sampled_from(list(places(record))))
        parent = record
        for step in path[:-1]:
            parent = parent[step]
        if draw(st.integers(0, 4)) == 0 and isinstance(parent, dict):
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = json.loads(json.dumps(draw(st.sampled_from(values))))  # a copy: it may be broken too
    return record
