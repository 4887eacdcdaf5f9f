#!/usr/bin/python3
# Parses a Prometheus text exposition on stdin with the reference parser (Debian's python3-prometheus-client) and
# prints every sample as JSON: [{"name", "labels", "value", "family", "type"}]. Exits non-zero on a parse error.
import json
import math
import sys

from prometheus_client.parser import text_string_to_metric_families

out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        v = s.value
        out.append({"name": s.name, "labels": s.labels, "family": family.name, "type": family.type,
                    "value": None if math.isinf(v) or math.isnan(v) else v})
json.dump(out, sys.stdout)
