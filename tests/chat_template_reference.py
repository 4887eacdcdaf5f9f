#!/usr/bin/env python3
"""Reference renderer for tests/test_chat_template.cpp: renders each case with python3-jinja2 in the environment
Hugging Face's apply_chat_template uses (sandboxed, trim_blocks, lstrip_blocks, loop controls, tojson as
json.dumps(ensure_ascii=False), raise_exception, strftime_now when a time is given).

usage: chat_template_reference.py CASES.json RESULTS.json
CASES.json: [{"template": str, "vars": {...}, "now": int or null}, ...]
RESULTS.json: one object per case: {"ok": text} | {"raise": message} | {"error": "Type: message"}
"""
import datetime
import json
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment


class Raised(Exception):
    pass


def raise_exception(message):
    raise Raised(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def render(case):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    now = case.get("now")
    if now is not None:
        when = datetime.datetime.fromtimestamp(now, tz=datetime.timezone.utc)
        env.globals["strftime_now"] = lambda fmt: when.strftime(fmt)
    try:
        return {"ok": env.from_string(case["template"]).render(**case["vars"])}
    except Raised as e:
        return {"raise": str(e)}
    except Exception as e:  # any other failure: the test only needs to know that it failed
        return {"error": type(e).__name__ + ": " + str(e)}


def main():
    with open(sys.argv[1], encoding="utf-8") as f:
        cases = json.load(f)
    results = [render(c) for c in cases]
    with open(sys.argv[2], "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False)


if __name__ == "__main__":
    main()
