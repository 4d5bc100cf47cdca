"""The Grafana dashboard in docker/grafana/ imports into any Grafana and queries only series that exist, by
labels they carry: gpuspawner's own, as gpuspawner.metrics exposes them, and NVIDIA dcgm-exporter's defaults.
Over an hour of series written out by hand, promtool finds each query's answer to be the one worked out here."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase

from gpuspawner import metrics
from helpers import unavailable

DASHBOARD = Path(__file__).resolve().parent.parent / "docker" / "grafana" / "gpuspawner.json"
DATA_SOURCE = {"type": "prometheus", "uid": "${datasource}"}

# NVIDIA dcgm-exporter's series: the fields its default counters file, etc/default-counters.csv in
# github.com/NVIDIA/dcgm-exporter (release 4.5.3-4.8.2, unchanged on main in May 2026), turns on.
DCGM_SERIES = frozenset({
    "DCGM_FI_DEV_SM_CLOCK", "DCGM_FI_DEV_MEM_CLOCK", "DCGM_FI_DEV_MEMORY_TEMP", "DCGM_FI_DEV_GPU_TEMP",
    "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "DCGM_FI_DEV_PCIE_REPLAY_COUNTER",
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_MEM_COPY_UTIL", "DCGM_FI_DEV_ENC_UTIL", "DCGM_FI_DEV_DEC_UTIL",
    "DCGM_FI_DEV_XID_ERRORS", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_RESERVED",
    "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "DCGM_FI_DEV_VGPU_LICENSE_STATUS",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE",
    "DCGM_FI_PROF_DRAM_ACTIVE", "DCGM_FI_PROF_PCIE_TX_BYTES", "DCGM_FI_PROF_PCIE_RX_BYTES",
})
# The labels on those series (internal/pkg/rendermetrics/render_metrics.go): UUID is the GPU's, and a MIG
# device's series carry its parent GPU's UUID with GPU_I_PROFILE and GPU_I_ID (the GPU instance's id, not
# the MIG device's UUID). The host is Hostname up to 4.5.3-4.8.2 and hostname after (PR #655); the default
# counters file also makes DCGM_FI_DRIVER_VERSION a label.
DCGM_LABELS = frozenset({
    "gpu", "UUID", "pci_bus_id", "device", "modelName", "GPU_I_PROFILE", "GPU_I_ID", "Hostname", "hostname",
    "DCGM_FI_DRIVER_VERSION",
})
TARGET_LABELS = frozenset({"instance", "job"})  # Prometheus adds them to every series it scrapes
GRAFANA_VARIABLES = frozenset({"__range", "__rate_interval", "__interval", "__range_s", "__interval_ms"})

# Series that a metric family of each type makes, and the labels a series adds to its family's.
SERIES_OF = {
    "gauge": {"": ()},
    "counter": {"_total": (), "_created": ()},
    "histogram": {"_bucket": ("le",), "_sum": (), "_count": (), "_created": ()},
    "summary": {"": ("quantile",), "_sum": (), "_count": (), "_created": ()},
    "info": {"_info": ()},
}


# --- Reading PromQL: enough of it to name the series and labels an expression uses ------------------------

TOKEN = re.compile(r"""
    (?P<space>\s+|\#[^\n]*)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{\w+(?::\w+)?\}|\$\w+|\[\[\w+\]\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+(?![\w.]))
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<name>[A-Za-z_:][\w:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],:@])
""", re.VERBOSE)
AGGREGATIONS = frozenset({
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
})
FUNCTIONS = frozenset({
    "abs", "absent", "absent_over_time", "acos", "acosh", "asin", "asinh", "atan", "atanh", "avg_over_time",
    "ceil", "changes", "clamp", "clamp_max", "clamp_min", "cos", "cosh", "count_over_time", "day_of_month",
    "day_of_week", "day_of_year", "days_in_month", "deg", "delta", "deriv", "end", "exp", "floor",
    "histogram_avg", "histogram_count", "histogram_fraction", "histogram_quantile", "histogram_stddev",
    "histogram_stdvar", "histogram_sum", "hour", "idelta", "increase", "irate", "label_join", "label_replace",
    "last_over_time", "ln", "log10", "log2", "mad_over_time", "max_over_time", "min_over_time", "minute",
    "month", "pi", "predict_linear", "present_over_time", "quantile_over_time", "rad", "rate", "resets",
    "round", "scalar", "sgn", "sin", "sinh", "sort", "sort_by_label", "sort_by_label_desc", "sort_desc", "sqrt",
    "start", "stddev_over_time", "stdvar_over_time", "sum_over_time", "tan", "tanh", "time", "timestamp",
    "vector", "year",
})
CLAUSES = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})


@dataclass
class Query:
    """What a PromQL expression uses: the series it names and the labels it relies on."""

    series: set[str] = field(default_factory=set)
    matched: set[tuple[str, str]] = field(default_factory=set)  # (series, label) in series{label="..."}
    grouped: set[str] = field(default_factory=set)  # labels in by/without/on/ignoring/group_* clauses
    joined: set[tuple[str, str]] = field(default_factory=set)  # (series, label): group_left(label) series
    made: set[str] = field(default_factory=set)  # labels label_replace/label_join write
    read: set[str] = field(default_factory=set)  # labels label_replace/label_join read


def tokens(expr: str) -> list[tuple[str, str]]:
    """(kind, text) of each token, whitespace and comments left out; a character PromQL lacks is an error."""
    found, at = [], 0
    while at < len(expr):
        match = TOKEN.match(expr, at)
        if not match:
            raise ValueError(f"cannot read the query from {expr[at:at + 20]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            found.append((kind, match.group()))
        at = match.end()
    return found


def closing(toks: list[tuple[str, str]], at: int) -> int:
    """The index of the bracket that closes the one at `at`."""
    pairs, depth = {"(": ")", "[": "]", "{": "}"}, 0
    opening = toks[at][1]
    for i in range(at, len(toks)):
        depth += (toks[i][1] == opening) - (toks[i][1] == pairs[opening])
        if depth == 0:
            return i
    raise ValueError(f"{opening!r} is never closed")


def arguments(toks: list[tuple[str, str]], at: int) -> list[list[tuple[str, str]]]:
    """The comma-separated arguments of the call whose "(" is at `at`."""
    args: list[list[tuple[str, str]]] = [[]]
    i, end = at + 1, closing(toks, at)
    while i < end:
        if toks[i][1] in "([{":
            args[-1] += toks[i:closing(toks, i) + 1]
            i = closing(toks, i) + 1
            continue
        if toks[i][1] == ",":
            args.append([])
        else:
            args[-1].append(toks[i])
        i += 1
    return args


def unquote(arg: list[tuple[str, str]]) -> str:
    assert len(arg) == 1 and arg[0][0] == "string", f"expected a string argument, got {arg}"
    return arg[0][1][1:-1]


def parse(expr: str) -> Query:
    """The series and labels `expr` uses. Strings, numbers, durations, ranges and Grafana variables name
    neither; a name followed by "(" must be a PromQL function; a bare {...} selector is refused, so that
    every series is named where this can see it."""
    query, toks, i = Query(), tokens(expr), 0
    while i < len(toks):
        kind, text = toks[i]
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if text == "[":  # a range or subquery: durations and variables only
            i = closing(toks, i) + 1
            continue
        if text == "{":
            raise ValueError(f"name the series before {{...}} in {expr!r}")
        if kind != "name":
            i += 1
            continue
        word = text.lower()
        if word in CLAUSES:
            labels: list[str] = []
            if following == "(":
                end = closing(toks, i + 1)
                labels = [t for k, t in toks[i + 2:end] if k == "name"]
                assert all(t == "," for k, t in toks[i + 2:end] if k != "name"), f"odd {text}(...) in {expr!r}"
                i = end
            query.grouped.update(labels)
            rhs = toks[i + 1] if i + 1 < len(toks) else ("", "")
            after = toks[i + 2][1] if i + 2 < len(toks) else ""
            if word in ("group_left", "group_right") and rhs[0] == "name" and after != "(":
                query.joined.update((rhs[1], label) for label in labels)
        elif word in KEYWORDS or word in AGGREGATIONS:
            pass
        elif following == "(":
            if text not in FUNCTIONS:
                raise ValueError(f"{text}(...) is no PromQL function, in {expr!r}")
            if text in ("label_replace", "label_join"):
                args = arguments(toks, i + 1)
                query.made.add(unquote(args[1]))
                sources = [args[3]] if text == "label_replace" else args[3:]
                query.read.update(unquote(a) for a in sources)
        else:
            query.series.add(text)
            if following == "{":
                end = closing(toks, i + 1)
                query.matched.update((text, t) for k, t in toks[i + 2:end] if k == "name")
                i = end
        i += 1
    return query


# --- What exists ---------------------------------------------------------------------------------------------


@functools.cache
def gpuspawner_labels() -> dict[str, frozenset[str]]:
    """Each series gpuspawner.metrics exposes -> its label names, read off the module's metrics.

    prometheus_client gives no public way to ask a metric that has no samples yet for its label names;
    its metric objects and the families a collector yields both keep them in ``_labelnames``. A series
    metric_names() lists that neither shows (one a collector yields only once sampled) has no labels.
    """
    families: list[tuple[str, str, tuple[str, ...]]] = []
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            families += [(f.name, f.type, value._labelnames) for f in value.describe()]
        elif type(value).__module__ == metrics.__name__ and hasattr(value, "collect"):  # its collectors
            families += [(f.name, f.type, f._labelnames) for f in value.collect()]
    labels = {name: frozenset() for name in metrics.metric_names()}
    for name, kind, names in families:
        for suffix, extra in SERIES_OF[kind].items():
            labels[name + suffix] = frozenset(names) | frozenset(extra)
    return labels


def labels_of(series: str) -> frozenset[str]:
    """The labels `series` carries once scraped; empty for a series nobody exposes."""
    if series in DCGM_SERIES:
        return DCGM_LABELS | TARGET_LABELS
    return gpuspawner_labels().get(series, frozenset()) | TARGET_LABELS


# --- The dashboard ------------------------------------------------------------------------------------------


@functools.cache
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panels() -> Iterator[dict[str, Any]]:
    for panel in dashboard()["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row holds its panels


def queries() -> list[Any]:
    return [pytest.param(t["expr"], id=f"{p['title']} {t['refId']}") for p in panels() for t in p["targets"]]


def variables() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = dashboard()["templating"]["list"]
    return found


def test_the_dashboard_is_json_for_a_current_grafana_that_asks_for_a_prometheus_data_source() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert isinstance(board["schemaVersion"], int) and board["schemaVersion"] >= 39  # Grafana 11 and later
    assert board["uid"] and board["title"] and board["id"] is None
    sources = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert [(v["name"], v["query"]) for v in sources] == [("datasource", "prometheus")]
    assert "__inputs" not in board, "one way to pick the data source: the ${datasource} variable"


def test_panel_ids_are_unique() -> None:
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids)), ids


@pytest.mark.parametrize("panel", list(panels()), ids=lambda p: str(p.get("title") or p.get("id")))
def test_every_panel_has_a_title_and_queries_the_chosen_data_source(panel: dict[str, Any]) -> None:
    assert panel.get("title")
    assert panel.get("targets"), "a panel without a query shows nothing"
    assert panel["datasource"] == DATA_SOURCE
    refs = [t["refId"] for t in panel["targets"]]
    assert len(refs) == len(set(refs)), refs
    for target in panel["targets"]:
        assert target["datasource"] == DATA_SOURCE
        assert target["expr"].strip()


@pytest.mark.parametrize("expr", queries())
def test_every_series_a_query_names_exists(expr: str) -> None:
    unknown = parse(expr).series - metrics.metric_names() - DCGM_SERIES
    assert not unknown, f"neither gpuspawner.metrics nor dcgm-exporter's default counters expose {sorted(unknown)}"


@pytest.mark.parametrize("expr", queries())
def test_every_label_a_query_uses_is_on_its_series(expr: str) -> None:
    query = parse(expr)
    missing = {(s, label) for s, label in query.matched | query.joined if label not in labels_of(s)}
    assert not missing, f"series lack the labels a selector or group_left names: {sorted(missing)}"
    present = set().union(*(labels_of(s) for s in query.series)) | query.made
    absent = (query.grouped | query.read) - present
    assert not absent, f"none of {sorted(query.series)} has the labels {sorted(absent)} that a clause names"


@pytest.mark.parametrize("expr", queries())
def test_every_grafana_variable_a_query_uses_is_defined(expr: str) -> None:
    used = set(re.findall(r"\$\{?([A-Za-z_]\w*)", expr)) | set(re.findall(r"\[\[(\w+)\]\]", expr))
    assert used <= {v["name"] for v in variables()} | GRAFANA_VARIABLES


@pytest.mark.parametrize("variable", [v for v in variables() if v["type"] == "query"], ids=lambda v: v["name"])
def test_every_query_variable_lists_the_values_of_a_label_its_series_has(variable: dict[str, Any]) -> None:
    text = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
    assert match, f"expected label_values(<series>, <label>), got {text!r}"
    query = parse(match[1])
    assert query.series and query.series <= metrics.metric_names() | DCGM_SERIES, f"unknown series in {text!r}"
    lacking = sorted(s for s in query.series if match[2] not in labels_of(s))
    assert not lacking, f"{lacking} have no label {match[2]!r}"
    assert variable["datasource"] == DATA_SOURCE


def test_the_utilisation_panel_joins_dcgm_to_the_holders_by_uuid() -> None:
    exprs = [parse(t["expr"]) for p in panels() for t in p["targets"]]
    joins = [q for q in exprs if "DCGM_FI_DEV_GPU_UTIL" in q.series and "gpuspawner_device_holder" in q.series]
    assert joins, "no panel joins DCGM_FI_DEV_GPU_UTIL with gpuspawner_device_holder"
    assert all({"UUID"} <= q.read and "uuid" in q.made and "uuid" in q.grouped for q in joins)


# --- The queries over an hour worked out by hand: ada holds two whole GPUs, bob one MIG slice ------------------

A100 = "NVIDIA A100-SXM4-80GB"
HOUR = {  # series -> its samples, one a minute for an hour (promtool's notation); a server "" has no label
    f'DCGM_FI_DEV_GPU_UTIL{{UUID="GPU-a",gpu="0",modelName="{A100}"}}': "50x60",
    f'DCGM_FI_DEV_GPU_UTIL{{UUID="GPU-b",gpu="1",modelName="{A100}"}}': "100x60",
    f'DCGM_FI_DEV_GPU_UTIL{{UUID="GPU-c",gpu="3",modelName="{A100}"}}': "30x60",  # nobody holds it
    'gpuspawner_device_holder{uuid="GPU-a",user="ada",profile="a100"}': "1x60",
    'gpuspawner_device_holder{uuid="GPU-b",user="ada",profile="a100"}': "1x60",
    'gpuspawner_device_holder{uuid="MIG-1",user="bob",server="exp",profile="mig"}': "1x60",
    f'gpuspawner_device_info{{uuid="GPU-a",index="0",model="{A100}"}}': "1x60",
    f'gpuspawner_device_info{{uuid="GPU-b",node="gpu-node-2",index="1",model="{A100}"}}': "1x60",  # on a swarm's node
    f'gpuspawner_device_info{{uuid="GPU-c",index="3",model="{A100}"}}': "1x60",
    f'gpuspawner_device_info{{uuid="MIG-1",index="2",model="{A100} MIG 1g.10gb",mig_profile="1g.10gb",parent_uuid="GPU-m"}}': "1x60",
    'gpuspawner_device_utilization_ratio{uuid="GPU-a"}': "0.5x60",
    'gpuspawner_device_utilization_ratio{uuid="GPU-b"}': "1x60",
    'gpuspawner_device_utilization_ratio{uuid="GPU-c"}': "0.3x60",  # NVML has none for MIG-1
    'gpuspawner_gpu_seconds_total{user="ada",profile="a100"}': "0+120x60",  # two GPUs
    'gpuspawner_gpu_seconds_total{user="bob",profile="mig"}': "0+6x60",
    'gpuspawner_gpu_idle_seconds_total{user="ada",profile="a100"}': "0+30x60",
    'gpuspawner_gpu_idle_seconds_total{user="bob",profile="mig"}': "0x60",
    f'gpuspawner_devices{{model="{A100}",state="held"}}': "2x60",
    f'gpuspawner_devices{{model="{A100}",state="free"}}': "1x60",
    f'gpuspawner_devices{{model="{A100} MIG 1g.10gb",state="held"}}': "1x60",
    'gpuspawner_queue_length{profile="a100"}': "3x60",
    'gpuspawner_spawn_duration_seconds_bucket{profile="a100",outcome="started",le="10"}': "0+1x60",
    'gpuspawner_spawn_duration_seconds_bucket{profile="a100",outcome="started",le="30"}': "0+2x60",
    'gpuspawner_spawn_duration_seconds_bucket{profile="a100",outcome="started",le="+Inf"}': "0+2x60",
    **{f'gpuspawner_spawn_duration_seconds_bucket{{profile="a100",outcome="refused",le="{le}"}}': "0+5x60"
       for le in ("1", "10", "30", "+Inf")},  # at once, and left out of the quantiles
    'gpuspawner_spawn_refusals_total{reason="no_devices"}': "0+2x60",
    'gpuspawner_spawn_refusals_total{reason="over_quota"}': "0+1x60",
}
ANSWERS = {  # (panel, refId) -> {labels: value} at the hour's end, for all users and the hour as the range
    ("GPU utilisation per user (DCGM exporter)", "A"): {'{user="ada",profile="a100"}': 0.75},  # not bob's MIG slice
    ("GPU utilisation per user (hub's NVML samples)", "A"): {'{user="ada",profile="a100"}': 0.75},
    ("GPU-hours per user (dashboard range)", "A"): {'{user="ada"}': 2, '{user="bob"}': 0.1},
    ("Idle GPU-hours per user (dashboard range)", "A"): {'{user="ada"}': 0.5, '{user="bob"}': 0},
    ("Devices by state", "A"): {f'{{model="{A100}",state="held"}}': 2, f'{{model="{A100}",state="free"}}': 1,
                                f'{{model="{A100} MIG 1g.10gb",state="held"}}': 1},
    ("Spawns waiting for a GPU, per profile", "A"): {'{profile="a100"}': 3},
    ("Spawn duration (p50, p95)", "A"): {'{profile="a100"}': 10},
    ("Spawn duration (p50, p95)", "B"): {'{profile="a100"}': 28},
    ("Spawn refusals by reason", "A"): {'{reason="no_devices"}': 2, '{reason="over_quota"}': 1},
    ("Who holds which device", "A"): {
        f'{{uuid="GPU-a",user="ada",profile="a100",index="0",model="{A100}"}}': 1,
        f'{{uuid="GPU-b",user="ada",profile="a100",node="gpu-node-2",index="1",model="{A100}"}}': 1,
        f'{{uuid="MIG-1",user="bob",server="exp",profile="mig",index="2",model="{A100} MIG 1g.10gb",'
        'mig_profile="1g.10gb",parent_uuid="GPU-m"}': 1,
    },
}
FILLED_IN = {"user": ".*", "__range": "1h", "__rate_interval": "5m"}  # as Grafana fills the variables in


def as_grafana_sends(expr: str) -> str:
    return re.sub(r"\$\{(\w+)\}|\$([A-Za-z_]\w*)", lambda m: FILLED_IN.get(m[1] or m[2], m[0]), expr)


def test_the_queries_give_the_answers_worked_out_by_hand(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (Debian package prometheus; docker/host/system-deps.sh test)")
    exprs = {(p["title"], t["refId"]): t["expr"] for p in panels() for t in p["targets"]}
    assert exprs.keys() == ANSWERS.keys(), "every query needs its answer worked out by hand in ANSWERS"
    checks = [  # rounded: promtool compares floats exactly, and 28 comes out as 27.999999999999996
        {"expr": f"round({as_grafana_sends(expr)}, 0.001)", "eval_time": "60m",
         "exp_samples": [{"labels": labels, "value": value} for labels, value in ANSWERS[key].items()]}
        for key, expr in exprs.items()
    ]
    spec = {"evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": [{"series": s, "values": v} for s, v in HOUR.items()],
        "promql_expr_test": checks,
    }]}
    (tmp_path / "dashboard.yml").write_text(json.dumps(spec, indent=1))  # JSON is YAML
    result = subprocess.run([promtool, "test", "rules", "dashboard.yml"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- The reader itself ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("expr", "series", "matched", "grouped", "joined"), [
    ('sum by (user) (increase(a_total{user=~"$user"}[$__range])) / 3600', {"a_total"}, {("a_total", "user")},
     {"user"}, set()),
    ('histogram_quantile(0.95, sum by (le) (rate(h_bucket{x!~"a|b}"}[5m]))) offset 1h', {"h_bucket"},
     {("h_bucket", "x")}, {"le"}, set()),
    ("a * on(uuid) group_left(user, server) b", {"a", "b"}, set(), {"uuid", "user", "server"},
     {("b", "user"), ("b", "server")}),
    ("a * ignoring(x) group_left c", {"a", "c"}, set(), {"x"}, set()),
    ('SUM(rate(c[1h30m:1m])) WITHOUT (job) > bool 0 and d # "e" is a comment', {"c", "d"}, set(), {"job"}, set()),
    ('count_values("v", m) or vector(0) unless rate(n[${__rate_interval}]) > Inf', {"m", "n"}, set(), set(), set()),
], ids=["range-and-variables", "strings-durations-offset", "group-left", "bare-group-left", "keywords-subquery",
        "string-arguments"])
def test_the_reader_finds_the_series_and_labels_a_query_uses(
    expr: str, series: set[str], matched: set[tuple[str, str]], grouped: set[str], joined: set[tuple[str, str]],
) -> None:
    query = parse(expr)
    assert (query.series, query.matched, query.grouped, query.joined) == (series, matched, grouped, joined)


def test_the_reader_sees_which_labels_label_replace_reads_and_writes() -> None:
    query = parse('label_replace(DCGM_FI_DEV_GPU_UTIL{GPU_I_ID=""}, "uuid", "$1", "UUID", "(.+)") / 100')
    assert (query.series, query.made, query.read) == ({"DCGM_FI_DEV_GPU_UTIL"}, {"uuid"}, {"UUID"})


@pytest.mark.parametrize("expr", ['{__name__="a"}', "sum(ratee(a[5m]))", "a ; b"],
                         ids=["bare-selector", "unknown-function", "not-promql"])
def test_the_reader_refuses_what_it_cannot_check(expr: str) -> None:
    with pytest.raises(ValueError):
        parse(expr)
