"""Static checks of deploy/ (no Docker engine runs here): the files parse and configure wildloop
only through settings that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from services.settings import WildloopSettings

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def setting_exists(variable: str) -> bool:
    path = variable.removeprefix("WILDLOOP_").lower().split("__")
    model: type[BaseModel] = WildloopSettings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        if i < len(path) - 1:
            inner = field.annotation
            if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
                return False
            model = inner
    return True


def test_every_wildloop_variable_in_compose_is_a_real_setting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = 0
    for service in compose()["services"].values():
        for name, value in (service.get("environment") or {}).items():
            if name.startswith("WILDLOOP_"):
                assert setting_exists(name), f"{name} is not a wildloop setting"
                monkeypatch.setenv(name, str(value))
                seen += 1
    assert seen
    settings = WildloopSettings()  # and the values validate together
    assert settings.mode == "production"


def test_compose_services_use_commands_the_cli_has() -> None:
    recorder = compose()["services"]["recorder"]
    assert recorder["command"] == ["serve", "recorder"]
    assert recorder["build"]["dockerfile"] == "deploy/Dockerfile"
    assert 'ENTRYPOINT ["wildloop"]' in (DEPLOY / "Dockerfile").read_text()


# --- monitoring: deploy/prometheus ----------------------------------------------------------------

PROMETHEUS = DEPLOY / "prometheus"
# Labels Prometheus adds itself, and the bucket bound of histograms.
TARGET_LABELS = {"instance", "job", "le"}


def exported_metrics(tmp_path: Path) -> dict[str, tuple[str, ...]]:
    """Every sample name the services export (``_total``, ``_bucket``, ... included), with the
    labels it carries: the components' metric definitions, built as the services build them."""
    from gateway.metrics import GatewayMetrics  # noqa: PLC0415
    from gateway.outbox import Outbox  # noqa: PLC0415
    from learner.metrics import LearnerMetrics  # noqa: PLC0415
    from services.bus.embedded import EmbeddedEventLog  # noqa: PLC0415
    from services.detector.metrics import DetectorMetrics  # noqa: PLC0415
    from services.metrics import Metrics  # noqa: PLC0415
    from services.settings import Topics  # noqa: PLC0415
    from services.worker import WorkerMetrics  # noqa: PLC0415

    gateway, detector, recorder, learner = (
        Metrics(c) for c in ("gateway", "detector", "recorder", "learner")
    )
    GatewayMetrics(gateway)
    log = EmbeddedEventLog(tmp_path / "events.db")
    outbox = Outbox(
        tmp_path / "outbox.db", publisher=log.publisher(), topics=Topics(), metrics=gateway
    )
    DetectorMetrics(detector, window_s=60)
    WorkerMetrics(detector)
    WorkerMetrics(recorder)
    LearnerMetrics(learner)
    outbox.close(flush_timeout_s=0)
    log.close()
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
    names: dict[str, tuple[str, ...]] = {}
    for metrics in (gateway, detector, recorder, learner):
        for collector in set(metrics.registry._names_to_collectors.values()):
            labels = tuple(collector._labelnames)  # type: ignore[attr-defined]
            for family in collector.collect():
                for suffix in suffixes[family.type]:
                    names[family.name + suffix] = labels
    return names


def alert_rules() -> list[dict]:  # type: ignore[type-arg]
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def checked_labels(name: str, expr: str, exported: dict[str, tuple[str, ...]]) -> set[str]:
    """Check that ``expr`` uses only exported wildloop metrics, each with labels it has, and
    aggregates only by labels its metrics carry; return the labels its series can carry."""
    used = re.findall(r"\b(wildloop_[a-z0-9_]+)(\{[^}]*\})?", expr)
    assert used, f"{name}: no wildloop metric in {expr!r}"
    labels: set[str] = set(TARGET_LABELS)
    for metric, selector in used:
        assert metric in exported, f"{name}: {metric} is not exported by any service"
        labels |= set(exported[metric])
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in exported[metric], f"{name}: {metric} has no label {label!r}"
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        for label in (x.strip() for x in group.split(",")):
            assert label in labels, f"{name}: aggregates by unknown label {label!r}"
    return labels


def test_alert_rules_use_only_metrics_and_labels_the_services_export(tmp_path: Path) -> None:
    exported = exported_metrics(tmp_path)
    rules = alert_rules()
    assert len({r["alert"] for r in rules}) == len(rules) >= 10
    for rule in rules:
        name = rule["alert"]
        if rule["expr"].startswith("up{"):  # Prometheus's own series
            continue
        labels = checked_labels(name, rule["expr"], exported)
        text = " ".join(str(v) for v in (rule.get("annotations") or {}).values())
        for label in re.findall(r"\$labels\.(\w+)", text):
            assert label in labels, f"{name}: its annotations use unknown label {label!r}"
        assert rule["labels"]["severity"] in ("warning", "critical")


def dashboard_targets() -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "wildloop.json").read_text())
    return [
        (panel["title"], target)
        for panel in dashboard["panels"]
        for target in panel.get("targets", ())
    ]


def test_the_dashboard_queries_are_valid_promql_over_exported_metrics(tmp_path: Path) -> None:
    import promql_parser  # noqa: PLC0415

    exported = exported_metrics(tmp_path)
    targets = dashboard_targets()
    assert len(targets) >= 15
    for title, target in targets:
        # Grafana fills in $__rate_interval before Prometheus sees the query.
        expr = target["expr"].replace("$__rate_interval", "1m")
        promql_parser.parse(expr)
        labels = checked_labels(title, expr, exported)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
            assert label in labels, f"{title}: the legend uses unknown label {label!r}"
    titles = " ".join(title for title, _ in targets)
    assert "DSAT rate by model and adapter" in titles and "Label lag" in titles


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    grafana = DEPLOY / "grafana"
    source = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())
    (datasource,) = source["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    uids = {t["datasource"]["uid"] for _, t in dashboard_targets()}
    assert uids == {datasource["uid"]}
    provider = yaml.safe_load((grafana / "provisioning/dashboards/wildloop.yml").read_text())
    path = provider["providers"][0]["options"]["path"]
    mounts = compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{path}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts


def test_every_alert_expression_is_valid_promql() -> None:
    import promql_parser  # noqa: PLC0415

    for rule in alert_rules():
        promql_parser.parse(rule["expr"])  # raises ValueError on a syntax error
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", "0s"))), rule["alert"]
    with pytest.raises(ValueError):
        promql_parser.parse("sum by (job (up)")


def test_the_alert_rules_check_out_the_issue_goals_and_the_no_loss_guarantees() -> None:
    exprs = {r["alert"]: r["expr"] for r in alert_rules()}
    assert "wildloop_detector_dsat_rate_ratio" in exprs["WildloopDsatRateHigh"]
    assert "> 1" in exprs["WildloopLabelLagHigh"]  # the detector's goal: label lag p99 < 1 s
    assert "wildloop_gateway_unlogged_answers_total" in exprs["WildloopGatewayAnswersNotLogged"]
    assert "wildloop_gateway_outbox_depth_events" in exprs["WildloopGatewayBacklogFilling"]


def test_prometheus_scrapes_every_service_on_the_port_it_serves_metrics_on() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    services = compose()["services"]
    scraped: dict[str, int] = {}
    for job in config["scrape_configs"]:
        (sd,) = job["dns_sd_configs"]
        (host,) = sd["names"]
        assert host in services, f"job {job['job_name']} scrapes no compose service"
        scraped[host] = sd["port"]
    for name, service in services.items():
        env = service.get("environment") or {}
        if service.get("command", [None])[0] == "serve":  # a wildloop service
            port = env.get(
                "WILDLOOP_GATEWAY__PORT" if name == "gateway" else "WILDLOOP_METRICS_PORT"
            )
            assert scraped.get(name) == int(port), f"{name}'s metrics are not scraped"
            if name != "gateway":  # the gateway serves /metrics on its own port
                assert env["WILDLOOP_METRICS_HOST"] == "0.0.0.0", f"{name} listens on loopback only"
    assert scraped["vllm"] == 8000
    mounts = services["prometheus"]["volumes"]
    for rule_file in config["rule_files"]:
        assert any(m.endswith(f":{rule_file}:ro") for m in mounts)
