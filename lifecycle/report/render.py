"""Render :class:`~lifecycle.report.collect.ReportData` as one self-contained HTML page.

Styles, the little script and every picture are inside the file (PNGs as data URIs, the lineage
as inline SVG): it opens from disk, from an MLflow artifact view or an e-mail attachment with no
network. Every value that came from MLflow is escaped.
"""

from __future__ import annotations

from datetime import datetime, timezone
from html import escape
from typing import Any, Iterable, Sequence

from lifecycle.report import charts
from lifecycle.report.collect import ReportData

#: Section ids, in page order (the browser test checks them).
SECTIONS = ("summary", "lineage", "training", "evaluation", "gates", "ledger", "monitoring", "canary")

EVAL_COLUMNS = ("eval/loss", "eval/perplexity", "eval/bits_per_byte", "eval/rougeL", "eval/latency_p95_ms")
COMPARE_COLUMNS = ("compare/loss_delta", "compare/loss_delta_ci_low", "compare/loss_delta_ci_high",
                   "compare/bits_per_byte_delta", "compare/win_rate")

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:18px 28px}
header h1{margin:0 0 4px 0;font-size:24px} header p{margin:0;color:#cfd8e3;font-size:13px}
nav{background:#fff;border-bottom:1px solid #ddd;padding:8px 28px;position:sticky;top:0}
nav a{margin-right:16px;color:#243447;text-decoration:none;font-size:14px}
main{padding:8px 28px 40px 28px;max-width:1200px}
section{background:#fff;border:1px solid #e3e3e3;border-radius:8px;padding:14px 18px;margin:16px 0}
h2{font-size:18px;margin:0 0 10px 0} h3{font-size:15px;margin:14px 0 6px 0}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #e0e0e0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f7} td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#1b7f3b;font-weight:600} .fail{color:#b3261e;font-weight:600} .skipped,.muted{color:#888}
.warn{color:#b26a00;font-weight:600} .ok{color:#1b7f3b;font-weight:600} .retrain{color:#b3261e;font-weight:600}
.champion{background:#eaf7ea}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;background:#e6ebf1;margin-right:4px}
img{max-width:100%;border:1px solid #eee} svg.lineage{max-width:100%;height:auto}
svg .coltitle{font-size:12px;font-weight:600;fill:#555} svg .b1{font-size:12px;font-weight:600;fill:#222}
svg .b2{font-size:11px;fill:#555}
code{font-size:12px;background:#f3f3f3;padding:1px 4px;border-radius:3px}
label{font-size:13px}
"""

# Shows times in the reader's own time zone (the page carries UTC) and filters the ledger.
# Written defensively: a report with no ledger rows must not throw.
_SCRIPT = """
(function(){
  document.querySelectorAll('time[datetime]').forEach(function(el){
    var d = new Date(el.getAttribute('datetime'));
    if (!isNaN(d.getTime())) { el.title = el.textContent; el.textContent = d.toLocaleString(); }
  });
  var box = document.getElementById('effective-only');
  if (box) {
    box.addEventListener('change', function(){
      document.querySelectorAll('#ledger tr[data-effective="false"]').forEach(function(row){
        row.style.display = box.checked ? 'none' : '';
      });
    });
  }
})();
"""


def _time(ts: float | None) -> str:
    if not ts:
        return '<span class="muted">-</span>'
    iso = datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="seconds")
    return f'<time datetime="{iso}">{escape(iso.replace("+00:00", " UTC"))}</time>'


def _fmt(value: Any) -> str:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return escape(str(value)) if value not in (None, "") else '<span class="muted">-</span>'
    if x != x:
        return '<span class="muted">n/a</span>'
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], *, row_attrs: Sequence[str] | None = None,
           numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        attrs = f" {row_attrs[i]}" if row_attrs and row_attrs[i] else ""
        cells = "".join(f'<td class="num">{c}</td>' if j in numeric else f"<td>{c}</td>" for j, c in enumerate(row))
        body.append(f"<tr{attrs}>{cells}</tr>")
    if not body:
        return '<p class="muted">nothing recorded</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _img(png: bytes | None, alt: str) -> str:
    if not png:
        return f'<p class="muted">no data for {escape(alt)}</p>'
    return f'<img alt="{escape(alt)}" src="{charts.data_uri(png)}">'


def _status(text: str) -> str:
    cls = text if text in ("pass", "fail", "skipped", "ok", "warn", "retrain") else ""
    return f'<span class="{cls}">{escape(text)}</span>'


def _summary(d: ReportData) -> str:
    aliases = " ".join(f'<span class="badge">@{escape(a)} &rarr; v{escape(v)}</span>'
                       for a, v in sorted(d.aliases.items()))
    last = d.events[-1] if d.events else None
    rows = [("Registered versions", str(len(d.versions))),
            ("Aliases", aliases or '<span class="muted">none</span>'),
            ("Ledger events", str(len(d.events)) + (f" (last: #{last.seq} {escape(last.action)} {escape(last.target)}, "
                                                    f"{_time(last.timestamp)})" if last else "")),
            ("Latest monitor verdict", _status(d.monitor.verdict) + f" ({_time(d.monitor.run.start)})" if d.monitor
             else '<span class="muted">never monitored</span>'),
            ("Retraining runs", str(len(d.retrain_runs))),
            ("Tracking", f"<code>{escape(d.tracking_uri)}</code>")]
    desc = f"<p>{escape(d.description)}</p>" if d.description else ""
    return desc + _table(("", ""), rows)


def _lineage(d: ReportData) -> str:
    by_version: dict[str, list[Any]] = {}
    for e in d.events:
        if e.to_version:
            by_version.setdefault(str(e.to_version), []).append(e)
    svg = charts.lineage_svg(d.versions, d.data_runs, by_version)
    rows = []
    for v in d.versions:
        data = "<br>".join(
            f"<code>{escape(r[:12])}</code> {escape(_data_label(d, r))}"
            + (" <span class='badge'>new</span>"
               if r == v.tags.get("data_run_id") and v.tags.get("base_data_run_id") else "")
            for r in v.data_runs) or '<span class="muted">unknown</span>'
        tr = v.train_run
        rows.append((f"v{escape(v.version)}" + "".join(f' <span class="badge">@{escape(a)}</span>' for a in v.aliases),
                     _time(v.created), data,
                     f"<code>{escape(tr.run_id[:12])}</code> {escape(tr.status)}" if tr else "-",
                     escape(v.tags.get("base_model", "-")),
                     f"<code>{escape(v.tags.get('data_digest', '')[:12])}</code>"))
    table = _table(("version", "created", "data runs (oldest first)", "training run", "started from", "data digest"),
                   rows)
    return f'<div>{svg}</div>{table}'


def _data_label(d: ReportData, run_id: str) -> str:
    run = d.data_runs.get(run_id)
    if run is None or run.missing:
        return "(run not found)"
    source = run.params.get("source", "")
    kept = run.metrics.get("data/documents_kept")
    return f"{source[-40:]}" + (f", {int(kept)} docs" if kept is not None else "")


def _training(d: ReportData) -> str:
    rows = []
    for v in d.versions:
        tr = v.train_run
        if tr is None or tr.missing:
            continue
        rows.append((f"v{escape(v.version)}", f"<code>{escape(tr.run_id[:12])}</code>",
                     escape(tr.params.get("preset", "-")),
                     _fmt(tr.metrics.get("train/steps")), _fmt(tr.metrics.get("val/best_loss")),
                     _fmt(tr.params.get("learning_rate")), _time(tr.start),
                     _fmt((tr.end - tr.start) if tr.end and tr.start else None)))
    return (_img(charts.training_curves(d.versions), "training curves")
            + _table(("version", "run", "preset", "steps", "best val/loss", "learning rate", "started", "seconds"),
                     rows, numeric=(3, 4, 5, 7)))


def _evaluation(d: ReportData) -> str:
    champion = d.aliases.get("production")
    rows, attrs = [], []
    for v in d.versions:
        if not any(k.startswith("eval/") for k in v.tags):
            continue
        role = "champion" if v.version == champion else ("challenger" if v.tags.get("compare_baseline") else "")
        rows.append((f"v{escape(v.version)}" + (f' <span class="badge">{role}</span>' if role else ""),
                     *[_fmt(v.tags.get(c)) for c in EVAL_COLUMNS],
                     f"<code>{escape(v.tags.get('eval_data_digest', '')[:12])}</code>"))
        attrs.append('class="champion"' if v.version == champion else "")
    table = _table(("version", *[c.split("/", 1)[1] for c in EVAL_COLUMNS], "eval data"), rows, row_attrs=attrs,
                   numeric=range(1, 1 + len(EVAL_COLUMNS)))
    crows = []
    for v in d.versions:
        if not v.tags.get("compare_baseline"):
            continue
        crows.append((f"v{escape(v.version)}", escape(v.tags["compare_baseline"]),
                      *[_fmt(v.tags.get(c)) for c in COMPARE_COLUMNS],
                      escape(v.tags.get("compare_paired_on", "-"))))
    compare = _table(("challenger", "against", "loss delta", "CI low", "CI high", "bits/byte delta", "win rate",
                      "paired on"), crows, numeric=range(2, 2 + len(COMPARE_COLUMNS)))
    new_rows = []
    for v in d.versions:
        run = d.eval_runs.get(v.tags.get("retrain.new_data_eval_run_id", ""))
        if run is not None and not run.missing:
            new_rows.append((f"v{escape(v.version)}", escape(run.params.get("eval.baseline", "-")),
                             _fmt(run.metrics.get("eval/loss")), _fmt(run.metrics.get("baseline/loss")),
                             _fmt(run.metrics.get("compare/loss_delta")),
                             _fmt(run.metrics.get("compare/bits_per_byte_delta"))))
    new_data = ("<h3>On the new data of a retraining</h3>"
                + _table(("version", "against", "loss", "baseline loss", "loss delta", "bits/byte delta"), new_rows,
                         numeric=(2, 3, 4, 5))) if new_rows else ""
    return (_img(charts.evaluation_bars(d.versions, champion), "evaluation per version") + table
            + "<h3>Champion vs challenger (same data, paired bootstrap)</h3>"
            + '<p class="muted">Negative deltas: the challenger is better. The interval is the bootstrap confidence '
              "interval of the loss delta.</p>" + compare + new_data)


def _gates(d: ReportData) -> str:
    parts = []
    for e in d.events:
        if not e.gates:
            continue
        rows = [(escape(g.get("gate", "")), escape(g.get("mode", "")), _status(str(g.get("status", ""))),
                 escape(g.get("reason", ""))) for g in e.gates]
        verdict = "passed" if e.action in ("promote", "ui_promote") else e.action
        parts.append(f"<h3>#{e.seq} v{escape(str(e.to_version))} &rarr; {escape(e.target)}: {escape(verdict)} "
                     f"({_time(e.timestamp)})</h3>" + _table(("gate", "mode", "result", "reason"), rows))
    return "".join(parts) or '<p class="muted">no gate was ever evaluated for this model</p>'


def _ledger(d: ReportData) -> str:
    rows, attrs = [], []
    for e in d.events:
        rows.append((str(e.seq), _time(e.timestamp), escape(e.action), escape(e.target),
                     f"{escape(str(e.from_version or '-'))} &rarr; {escape(str(e.to_version or '-'))}",
                     "yes" if e.effective else "no", escape(e.actor), escape(e.reason[:300])))
        attrs.append(f'data-effective="{"true" if e.effective else "false"}"')
    toggle = ('<p><label><input type="checkbox" id="effective-only"> only events that moved an alias</label></p>'
              if d.events else "")
    return (_img(charts.ledger_timeline(d.events), "ledger timeline") + toggle
            + _table(("#", "time", "action", "target", "from → to", "moved", "actor", "reason"), rows, row_attrs=attrs))


def _monitoring(d: ReportData) -> str:
    if d.monitor is None:
        return '<p class="muted">no monitor run yet: run <code>lifecycle monitor NAME</code></p>'
    m = d.monitor
    metrics = sorted((k, v) for k, v in m.run.metrics.items() if k.startswith("monitor/"))
    head = (f"<p>Latest run <code>{escape(m.run.run_id)}</code> on v{escape(m.run.tags.get('model_version', '?'))}"
            f" at {_time(m.run.start)}: verdict {_status(m.verdict)}"
            + (f" &mdash; {escape(m.reasons)}" if m.reasons else "") + "</p>")
    images = "".join(f"<h3>{escape(n)}</h3>{_img(png, n)}" for n, png in sorted(m.images.items()))
    history = _table(("run", "time", "version", "verdict"),
                     [(f"<code>{escape(r.run_id[:12])}</code>", _time(r.start),
                       escape(r.tags.get("model_version", "?")),
                       _status(r.tags.get("monitor.verdict", "?"))) for r in d.monitor_history])
    return (head + _table(("metric", "value"), [(escape(k), _fmt(v)) for k, v in metrics], numeric=(1,))
            + images + "<h3>Earlier verdicts</h3>" + history)


def _canary(d: ReportData) -> str:
    verdicts = [e for e in d.events if e.action == "canary_verdict"]
    if not verdicts:
        return ('<p class="muted">no canary yet: serve a challenger with <code>lifecycle serve NAME --canary staging '
                "--canary-share 0.1</code> and compare with <code>lifecycle canary NAME</code></p>")
    rows = []
    for e in verdicts:
        fig = {g.get("gate"): g for g in e.gates}
        head = fig.get("canary verdict", {})

        def pair(metric: str) -> str:
            g = fig.get(metric, {})
            return f"{_fmt(g.get('production'))} / {_fmt(g.get('challenger'))}"

        rows.append((str(e.seq), _time(e.timestamp), f"v{escape(str(e.from_version))}",
                     f"v{escape(str(e.to_version))}", _status(str(head.get("status", "?"))),
                     escape(str(head.get("code", "?"))),
                     f"{_fmt(head.get('production'))} / {_fmt(head.get('challenger'))}",
                     _fmt(head.get("shadow_dropped")),  # "-" for verdicts recorded before it was
                     pair("error_rate"), pair("latency_p95"), pair("completion_length")))
    other = [e for e in d.events if e.action in ("canary_start", "canary_step", "canary_rollback")]
    steps = _table(("#", "time", "action", "from → to", "reason"),
                   [(str(e.seq), _time(e.timestamp), escape(e.action),
                     f"{escape(str(e.from_version or '-'))} &rarr; {escape(str(e.to_version or '-'))}",
                     escape(e.reason[:300])) for e in other]) if other else ""
    return (_img(charts.canary_arms(d.events), "canary arms over time")
            + '<p class="muted">Each <code>lifecycle canary</code> run: production / challenger on the same '
              "traffic. Shadow copies dropped under load (queue full) never reached the challenger: they are "
              "counted apart, not as requests or errors.</p>"
            + _table(("#", "time", "production", "challenger", "result", "code", "requests", "shadow dropped",
                      "error rate", "latency p95 ms", "completion tokens"), rows) + steps)


def render(d: ReportData) -> str:
    """The whole page."""
    bodies = {"summary": ("Summary", _summary(d)), "lineage": ("Lineage", _lineage(d)),
              "training": ("Training curves", _training(d)), "evaluation": ("Evaluation", _evaluation(d)),
              "gates": ("Promotion gates", _gates(d)), "ledger": ("Ledger timeline", _ledger(d)),
              "monitoring": ("Monitoring", _monitoring(d)), "canary": ("Canary and shadow", _canary(d))}
    nav = "".join(f'<a href="#{sid}">{escape(bodies[sid][0])}</a>' for sid in SECTIONS)
    sections = "".join(f'<section id="{sid}"><h2>{escape(bodies[sid][0])}</h2>{bodies[sid][1]}</section>'
                       for sid in SECTIONS)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(d.name)} - lifecycle report</title><style>{_CSS}</style></head><body>"
            f"<header><h1>{escape(d.name)}</h1><p>Lifecycle report generated {_time(d.generated)} from "
            f"{escape(d.tracking_uri)}</p></header><nav>{nav}</nav><main>{sections}</main>"
            f"<script>{_SCRIPT}</script></body></html>\n")
