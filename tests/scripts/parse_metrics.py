"""Parses an OpenMetrics exposition with the reference parser (Python prometheus-client) and prints
its samples as one JSON object: {"name{label=\"value\"}": value, ...}. A malformed exposition raises,
and the exit status is non-zero.

    python parse_metrics.py METRICS.txt
"""

import json
import sys

from prometheus_client.openmetrics.parser import text_string_to_metric_families

text = open(sys.argv[1]).read()
samples = {}
types = {}
for family in text_string_to_metric_families(text):
    types[family.name] = family.type
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        samples[s.name + ("{" + labels + "}" if labels else "")] = s.value
print(json.dumps({"types": types, "samples": samples}, sort_keys=True))
