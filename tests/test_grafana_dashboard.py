"""deploy/grafana/genimg.json is valid Grafana dashboard JSON whose queries parse and cover the issue's panels.

Its queries are checked against the metric names a real worker, exporter and
Triton export in tests/test_prometheus_integration.py.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.fixtures.prometheus import (DASHBOARD, GRAFANA_GLOBALS, dashboard_queries,  # noqa: F401 - fixtures
                                       prometheus_binaries, promql_metric_names, promql_variables, promtool)

SCHEMA = DASHBOARD.parent / "dashboard.schema.json"


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _all_panels(dashboard: dict) -> list[dict]:
    return [p for panel in dashboard["panels"] for p in [panel, *panel.get("panels", [])]]


def test_the_dashboard_is_valid_grafana_dashboard_json(dashboard, validator):
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(dashboard)]
    assert errors == []


@pytest.mark.parametrize("break_it", [
    lambda d: d.pop("title"),
    lambda d: d.update(schemaVersion="39"),
    lambda d: d.update(graphTooltip=3),
    lambda d: d["panels"][1]["gridPos"].update(w=25),
    lambda d: d["panels"][1].pop("fieldConfig"),
    lambda d: d["panels"][1]["targets"][0].pop("expr"),
    lambda d: d["panels"][1].update(type=""),
    lambda d: d["templating"]["list"][0].update(type="dropdown"),
], ids=["no title", "schemaVersion a string", "graphTooltip 3", "panel wider than the grid",
        "panel without fieldConfig", "target without expr", "empty panel type", "unknown variable type"])
def test_the_schema_rejects_what_grafana_would_reject(dashboard, validator, break_it):
    broken = copy.deepcopy(dashboard)
    break_it(broken)
    assert list(validator.iter_errors(broken)), "the schema accepted a broken dashboard"


def test_panel_ids_are_unique_and_panels_do_not_overlap_on_the_24_column_grid(dashboard):
    panels = _all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_every_query_uses_the_datasource_variable_and_only_defined_variables(dashboard):
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables
    for p in _all_panels(dashboard):
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"], p["title"]
            assert promql_variables(t["expr"]) <= variables | GRAFANA_GLOBALS, (p["title"], t["expr"])


def test_every_query_is_valid_promql(dashboard, promtool, tmp_path: Path):
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m").replace("$queue", ".*")}
             for i, (_, expr) in enumerate(dashboard_queries(dashboard))]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_dashboard_shows_what_an_operator_needs(dashboard):
    used: dict[str, set[str]] = {}
    for title, expr in dashboard_queries(dashboard):
        used.setdefault(title, set()).update(promql_metric_names(expr))
    def panel_using(*names: str) -> list[str]:
        return [t for t, ms in used.items() if set(names) <= ms]

    assert panel_using("genimg_images_written_total")  # images/s
    assert panel_using("genimg_stage_seconds_sum", "genimg_images_written_total")  # s/image by stage
    assert panel_using("genimg_items_failed_total") and panel_using("genimg_shards_failed_total")  # failures
    assert panel_using("genimg_backlog_shards")
    assert panel_using("nv_inference_count", "nv_inference_exec_count")  # Triton batch size
    assert panel_using("nv_inference_queue_duration_us", "nv_inference_compute_infer_duration_us",
                       "nv_inference_request_success")  # queue and compute time
    assert panel_using("nv_gpu_utilization")
    by_stage = [e for _, e in dashboard_queries(dashboard) if "genimg_stage_seconds_sum" in e]
    assert any(re.search(r"by \(stage\)", e) for e in by_stage)


def test_the_metric_name_extractor_ignores_labels_ranges_grouping_functions_and_numbers():
    expr = ('sum by (le, stage) (rate(genimg_stage_seconds_bucket{job="w", queue=~"$queue"}[$__rate_interval])) '
            '/ on () group_left () sum(rate(other_total[5m] offset 1m)) / 1e6 > bool 0.5 or up')
    assert promql_metric_names(expr) == {"genimg_stage_seconds_bucket", "other_total", "up"}
    assert promql_variables(expr) == {"queue", "__rate_interval"}
