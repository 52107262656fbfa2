"""The Grafana dashboard: valid JSON, provisioned where compose mounts it, on the provisioned data source, and
every metric and label its PromQL uses is one the code actually exports (a renamed metric fails here)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "zenith.json"
SOURCES = ("stream", "state", "model", "deploy")
PROM_TYPES = {"Counter", "Gauge", "Histogram", "Summary"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
IMPLICIT_LABELS = {"job", "instance"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless"}


def _panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def _targets(dash: dict) -> list[tuple[str, str]]:
    """(PromQL expression, legend format) of every query."""
    return [(t["expr"], t.get("legendFormat", "")) for p in _panels(dash) for t in p.get("targets", [])
            if t.get("expr")]


def _exprs(dash: dict) -> list[str]:
    return [e for e, _ in _targets(dash)]


def _defined_metrics() -> dict[str, tuple[str, set[str]]]:
    """name -> (type, label names) for every prometheus_client metric constructed in our Python sources."""
    found: dict[str, tuple[str, set[str]]] = {}
    for pkg in SOURCES:
        for path in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                fn = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if fn not in PROM_TYPES or not node.args or not isinstance(node.args[0], ast.Constant):
                    continue
                name = node.args[0].value
                if not isinstance(name, str):
                    continue
                labels_node = node.args[2] if len(node.args) > 2 else next(
                    (k.value for k in node.keywords if k.arg == "labelnames"), None)
                labels = ({e.value for e in labels_node.elts if isinstance(e, ast.Constant)}
                          if isinstance(labels_node, ast.List | ast.Tuple) else set())
                found[name] = (fn, labels)
    return found


def _resolve(ref: str, defined: dict[str, tuple[str, set[str]]]) -> tuple[str, set[str]] | None:
    """The metric a series name in PromQL comes from: as defined, a histogram's _bucket/_sum/_count, or a
    counter defined without the _total that prometheus_client appends."""
    if ref in defined:
        return defined[ref][0], defined[ref][1] | ({"le"} if ref.endswith("_bucket") else set())
    for suffix in HISTOGRAM_SUFFIXES:
        base = ref.removesuffix(suffix)
        if base != ref and base in defined and defined[base][0] in ("Histogram", "Summary"):
            return defined[base][0], defined[base][1] | ({"le"} if suffix == "_bucket" else set())
    base = ref.removesuffix("_total")
    if base != ref and base in defined and defined[base][0] == "Counter":
        return defined[base]
    return None


@pytest.fixture(scope="module")
def dash() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_is_valid_and_panels_are_well_formed(dash: dict) -> None:
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    panels = _panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    data = [p for p in panels if p["type"] != "row"]
    assert len(data) >= 15
    for p in data:
        assert p["title"] and p["targets"], p
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_dashboard_is_where_compose_provisions_it_and_uses_the_provisioned_datasource(dash: dict) -> None:
    datasources = (ROOT / "deploy" / "grafana" / "provisioning" / "datasources.yml").read_text()
    uid = re.search(r"^\s*uid:\s*(\S+)", datasources, re.MULTILINE).group(1)
    for p in _panels(dash):
        for obj in [p, *p.get("targets", [])]:
            if "datasource" in obj:
                assert obj["datasource"] == {"type": "prometheus", "uid": uid}, p["title"]
    provider_path = re.search(r"^\s*path:\s*(\S+)", (ROOT / "deploy" / "grafana" / "provisioning" /
                                                     "dashboards.yml").read_text(), re.MULTILINE).group(1)
    mounts = re.findall(r"-\s*\.?/?([\w./-]+):" + re.escape(provider_path) + r"(?::ro)?\s*(?:#.*)?$",
                        (ROOT / "docker-compose.yml").read_text(), re.MULTILINE)
    assert mounts, f"docker-compose.yml mounts nothing at {provider_path}"
    # Grafana's file provider walks the folder recursively, so any JSON below the mounted folder is loaded.
    assert any(DASHBOARD.is_relative_to((ROOT / m).resolve()) for m in mounts), mounts


def test_every_metric_and_label_in_the_dashboard_is_exported_by_the_code(dash: dict) -> None:
    defined = _defined_metrics()
    assert "zenith_stream_events_total" in defined and "zenith_scorer_request_seconds" in defined  # the scan works
    sources = "\n".join(p.read_text() for pkg in SOURCES for p in (ROOT / pkg).rglob("*.py"))
    missing, bad_labels, bad_values = set(), [], []
    for expr, legend in _targets(dash):
        names = set(re.findall(r"\b(zenith_[a-z0-9_]+)\b", expr))
        assert names, f"an expression that reads no zenith metric: {expr}"
        known: set[str] = set(IMPLICIT_LABELS)
        for name in names:
            got = _resolve(name, defined)
            if got is None:
                missing.add(name)
                continue
            labels = got[1]
            known |= labels
            # label matchers on this series: name{label="value", ...}
            for body in re.findall(re.escape(name) + r"\{([^}]*)\}", expr):
                for label, value in re.findall(r'(\w+)\s*=~?\s*"([^"]*)"', body):
                    if label not in labels | IMPLICIT_LABELS:
                        bad_labels.append(f"{name}{{{label}}}")
                    elif label not in IMPLICIT_LABELS and f'"{value}"' not in sources:
                        bad_values.append(f'{name}{{{label}="{value}"}}')
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                if label not in known and label not in PROMQL_WORDS:
                    bad_labels.append(f"by ({label}) in {expr}")
        for legend_label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if legend_label not in known:
                bad_labels.append(f"legend {{{{{legend_label}}}}} in {expr}")
    assert not missing, f"metrics used by the dashboard but defined nowhere in {SOURCES}: {sorted(missing)}"
    assert not bad_labels, f"labels the metrics do not have: {bad_labels}"
    assert not bad_values, f"label values that appear nowhere in the code: {bad_values}"


def test_freshness_stages_and_the_main_views_are_on_the_dashboard(dash: dict) -> None:
    text = "\n".join(_exprs(dash))
    for metric in ("zenith_freshness_event_to_sample_seconds", "zenith_stream_close_delay_seconds",
                   "zenith_freshness_sample_to_trained_seconds", "zenith_freshness_trained_to_published_seconds",
                   "zenith_freshness_published_to_served_seconds", "zenith_freshness_event_to_served_seconds"):
        assert f"histogram_quantile(0.5, sum by (le) (rate({metric}_bucket" in text, metric
        assert f"histogram_quantile(0.99, sum by (le) (rate({metric}_bucket" in text, metric
    for needle in ("zenith_trainer_consumer_lag", 'metric="auc"', 'metric="uauc"', 'metric="logloss"',
                   "zenith_trainer_samples_total", "zenith_stream_samples_total", "zenith_stream_events_total",
                   "zenith_stream_deadletters_total", "zenith_stream_engagements_total",
                   "zenith_scorer_request_seconds_bucket", "zenith_scorer_requests_total",
                   "zenith_scorer_model_version", "zenith_scorer_model_data_age_seconds"):
        assert needle in text, needle
