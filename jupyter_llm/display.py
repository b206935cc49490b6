"""Rich display of runs for notebooks and terminals: plain HTML and text snapshots.

The live view is `jupyter_llm.widgets.Dashboard`; these are its static counterparts
(`%llm_status`, `%llm_runs`, the HTML of a run in a saved notebook).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .files import gib_text
from .folder import RunFolder
from .summary import duration_s, fmt_duration, prepare_progress, progress, startup, startup_text, stats_rows

if TYPE_CHECKING:
    from .errors import SpecError
    from .preflight import DryRun

COLORS = {"completed": "#2e7d32", "failed": "#c62828", "stopped": "#6d4c41", "running": "#1565c0",
          "starting": "#6a1b9a", "resuming": "#6a1b9a", "stopping": "#c2410c", "created": "#616161",
          "damaged": "#ad1457"}  # fmt: skip


# one colour per run, in this order everywhere (dashboard overlays, comparisons): each at least
# 3:1 against JupyterLab's light (#fff) and dark (#111) backgrounds, as lines must be
PALETTE = ["#3d7fd9", "#e0453a", "#2e9e44", "#9b5fd6", "#d9730d", "#0f9ba8", "#a07840", "#d6418f"]
METRIC_TITLES = {"final_loss": "final loss", "best_val_loss": "best val loss", "ppl": "perplexity",
                 "loss": "eval loss", "masked_accuracy": "masked accuracy", "bleu": "BLEU", "rouge1": "ROUGE-1",
                 "rouge2": "ROUGE-2", "rougeL": "ROUGE-L"}  # fmt: skip


# text in a colour that reads in both themes: JupyterLab's own variables (error-color1 and
# success-color0 are 4.5:1 on its light and dark backgrounds), and a fallback elsewhere
TEXT = {"error": "var(--jp-error-color1, #c62828)", "ok": "var(--jp-success-color0, #2e7d32)",
        "muted": "var(--jp-ui-font-color2, #616161)"}  # fmt: skip


def swatch(color: str) -> str:
    """A run's colour square beside its name (a graphic: 3:1 is its contrast rule, not text's)."""
    return f'<span class="jupyter-llm-swatch" style="color:{color}">■</span>'


def run_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def comparison_html(c: Any) -> str:
    """`%llm_compare`'s tables — training (state, steps, duration, final and best losses) and
    evaluation (checkpoint and every metric some run has, a hint where a run has none) — and
    where the specs differ. Two narrow tables rather than one wide one: they fit a 460-px notebook."""
    wrap = "word-break:break-word"
    names = [f"<td style='{wrap}'>{swatch(run_color(i))} <b>{html.escape(label)}</b>"
             f"<div style='font-size:80%;opacity:.75;word-break:break-all'>{html.escape(r['run'])}</div></td>"
             for i, (r, label) in enumerate(zip(c.rows, c.labels(), strict=True))]  # fmt: skip

    def num(v: Any) -> str:
        return "–" if v is None else format(v, ".4g")

    head = "".join(f"<th>{h}</th>" for h in ["run", "state", "steps", "took"])
    head += "".join(
        f"<th style='{wrap}'>{html.escape(METRIC_TITLES.get(k, k))}</th>" for k in c.train_metrics
    )
    body = "".join(
        f"<tr>{name}<td>{badge(r['state'])}</td><td>{r['steps']}</td><td>{fmt_duration(r['duration_s'])}</td>"
        + "".join(f"<td>{num(r[k])}</td>" for k in c.train_metrics) + "</tr>"
        for name, r in zip(names, c.rows, strict=True)
    )  # fmt: skip
    out = f"<table class='jupyter-llm-compare'><tr>{head}</tr>{body}</table>"
    if c.metrics:  # a metric per row, a run per column: as many columns as runs, not as metrics
        labels = "".join(
            f"<th>{swatch(run_color(i))} {html.escape(n)}</th>" for i, n in enumerate(c.labels())
        )
        rows = "<tr><td>checkpoint</td>" + "".join(
            f"<td>{html.escape(str(r['checkpoint']))}</td>" if r["checkpoint"] is not None else
            f"<td title='{html.escape('%llm_eval ' + str(r['name']) + ' --wait', quote=True)}'><i>not evaluated</i></td>"
            for r in c.rows
        ) + "</tr>"  # fmt: skip
        rows += "".join(
            f"<tr><td style='{wrap}'>{html.escape(METRIC_TITLES.get(k, k))}</td>"
            + "".join(f"<td>{num(r[k])}</td>" for r in c.rows) + "</tr>"
            for k in c.metrics
        )  # fmt: skip
        out += f"<h4>Evaluations</h4><table class='jupyter-llm-compare-evals'><tr><th></th>{labels}</tr>{rows}</table>"
    if c.unevaluated and c.metrics:
        out += (f"<p style='opacity:.8'>not evaluated: {html.escape(', '.join(c.unevaluated))} — "
                "<code>%llm_eval NAME --wait</code> (or an <code>eval:</code> section in the spec) adds them here</p>")  # fmt: skip
    if c.spec_diff:
        labels = "".join(
            f"<th>{swatch(run_color(i))} {html.escape(n)}</th>" for i, n in enumerate(c.labels())
        )
        rows = "".join(
            f"<tr><td style='{wrap}'><code>{html.escape(k)}</code></td>"
            + "".join(f"<td style='word-break:break-all'>{html.escape(json.dumps(v))}</td>" for v in vals) + "</tr>"
            for k, vals in c.spec_diff.items()
        )  # fmt: skip
        out += f"<h4>Where the specs differ</h4><table class='jupyter-llm-spec-diff'><tr><th>key</th>{labels}</tr>{rows}</table>"
    elif len(c.rows) > 1:
        out += "<p>the specs are the same (apart from their names)</p>"
    return out


def badge(text: str, state: str | None = None) -> str:
    """A state's badge; `text` may be a start-up phase shown in the colour of `state`."""
    color = COLORS.get(state or text, "#616161")
    return (f'<span style="background:{color};color:white;padding:1px 7px;border-radius:8px;'
            f'font-size:90%;white-space:nowrap">{html.escape(text)}</span>')  # fmt: skip


def histogram_html(hist: dict[str, int]) -> str:
    """Document lengths in power-of-two bins, as plain HTML bars."""
    if not hist:
        return ""
    top = max(hist.values())
    bars = "".join(
        f'<tr><td style="text-align:right">&lt; {2 ** int(k[2:]):,}</td><td><div style="background:#1565c0;'
        f'height:10px;width:{max(1, int(200 * v / top))}px"></div></td><td>{v:,}</td></tr>'
        for k, v in sorted(hist.items(), key=lambda kv: int(kv[0][2:]))
    )
    return f"<table><tr><th>chars</th><th>documents</th><th></th></tr>{bars}</table>"


def _prepare_html(run: RunFolder) -> str:
    p = prepare_progress(run)
    pct = int(100 * p["fraction"])
    body = (
        f'<div style="margin:4px 0"><progress value="{pct}" max="100" style="width:60%"></progress> '
        f"{html.escape(p['phase'])} ({pct}% of the input, {p['tokens']:,} tokens)</div>"
    )
    if p["ready"]:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,}</td></tr>" if isinstance(v, int) and not
                       isinstance(v, bool) else f"<tr><td>{html.escape(k)}</td><td>{v}</td></tr>"
                       for k, v in stats_rows(p["ready"]))  # fmt: skip
        body = f"<table>{rows}</table>" + histogram_html((p["index"] or {}).get("length_histogram", {}))
    err = f'<div style="color:{TEXT["error"]}">{html.escape(str(p["error"]))}</div>' if p["error"] else ""
    return (
        f'<div class="jupyter-llm-run"><b>{html.escape(run.id)}</b> (prepare) {badge(p["state"])}'
        f'{body}{err}<div style="color:{TEXT["muted"]};font-size:85%">{html.escape(str(run.path))}</div></div>'
    )


def run_html(run: RunFolder) -> str:
    if run.status().get("job") == "prepare":
        return _prepare_html(run)
    p = progress(run)
    pct = int(100 * p["fraction"])
    eta = f" · ETA {fmt_duration(p['eta_s'])}" if p["eta_s"] is not None else ""
    cells = []
    for key, m in (("loss", p["last"]), ("lr", p["last"]), ("grad_norm", p["last"]), ("tokens_per_s", p["last"]),
                   ("val_loss", p["last_val"]), ("val_ppl", p["last_val"])):  # fmt: skip
        if m.get(key) is not None:
            cells.append(f"<td><b>{key}</b> {m[key]:.4g}</td>")
    err = f'<div style="color:{TEXT["error"]}">{html.escape(str(p["error"]))}</div>' if p["error"] else ""
    start = startup(run)
    where = f"step {p['step']}/{p['total'] or '?'} ({pct}%){eta}"
    if start is not None:  # before the first metric: what it is doing
        where = f"<span class='jupyter-llm-startup'>{html.escape(startup_text(start))}</span>"
    shown = p["state"] if start is None else start["phase"]
    return (
        f'<div class="jupyter-llm-run"><b>{html.escape(run.id)}</b> {badge(shown, p["state"])}'
        f'<div style="margin:4px 0"><progress value="{pct}" max="100" style="width:60%"></progress> '
        f"{where}</div>"
        f"<table><tr>{''.join(cells)}</tr></table>{err}"
        f'<div style="color:{TEXT["muted"]};font-size:85%">{html.escape(str(run.path))}</div></div>'
    )


def runs_rows(runs: Sequence[RunFolder]) -> list[dict[str, Any]]:
    rows = []
    for r in runs:
        p, st = progress(r), r.status()  # a damaged folder is a row in state `damaged`
        rows.append({"run_id": r.id, "name": st.get("name"), "state": p["state"], "step": p["step"],
                     "total": p["total"], "loss": p["last"].get("loss"), "started": (st.get("started_at") or "")[:19],
                     "duration_s": duration_s(st)})  # fmt: skip
    return rows


class RunsListing:
    """`%llm_runs`: id, name, state, step/total, last loss, started, duration."""

    def __init__(self, runs: Sequence[RunFolder]):
        self.rows = runs_rows(runs)

    def _repr_html_(self) -> str:
        if not self.rows:
            return "<i>no runs</i>"
        head = "".join(
            f"<th>{h}</th>" for h in ("run", "name", "state", "step", "loss", "started", "duration")
        )
        body = "".join(
            f"<tr><td>{html.escape(r['run_id'])}</td><td>{html.escape(str(r['name']))}</td><td>{badge(r['state'])}</td>"
            f"<td>{r['step']}/{r['total'] or '?'}</td><td>{'' if r['loss'] is None else format(r['loss'], '.4f')}</td>"
            f"<td>{r['started'].replace('T', ' ')}</td><td>{fmt_duration(r['duration_s'])}</td></tr>"
            for r in self.rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    def __repr__(self) -> str:
        if not self.rows:
            return "no runs"
        lines = [f"{'RUN':<44} {'STATE':<10} {'STEP':>11} {'LOSS':>8} {'STARTED':<19} DURATION"]
        for r in self.rows:
            loss = "-" if r["loss"] is None else f"{r['loss']:.4f}"
            lines.append(f"{r['run_id']:<44} {r['state']:<10} {str(r['step']) + '/' + str(r['total']):>11} "
                         f"{loss:>8} {r['started'].replace('T', ' '):<19} {fmt_duration(r['duration_s'])}")  # fmt: skip
        return "\n".join(lines)


def spec_error_text(err: SpecError) -> str:
    """field → problem (given), aligned, for a UsageError."""
    rows = err.table()
    width = max(len(f) for f, _, _ in rows)
    lines = [f"the spec has {len(rows)} problem(s):"]
    lines += [f"  {f:<{width}}  {msg}" + (f" (given: {given})" if given else "") for f, given, msg in rows]
    return "\n".join(lines)


def memory_html(memory: dict[str, Any] | None, error: str | None) -> str:
    """The per-rank memory estimate of each ZeRO stage, as a table."""
    if not memory:
        return f"<p>memory estimate unavailable: {html.escape(error)}</p>" if error else ""
    rows = "".join(
        f"<tr><td>ZeRO {s}</td><td>{gib_text(m['device'])}</td><td>{gib_text(m['cpu'])}</td>"
        f"<td>{html.escape(m['source'])}</td></tr>"
        for s, m in memory["per_rank_gib"].items()
    )
    derived = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:,}</td></tr>"
                      for k, v in memory.get("zero3_settings", {}).items())  # fmt: skip
    return (f"<h4>Memory per rank ({memory['params']:,} parameters)</h4><table><tr><th>stage</th>"
            f"<th>device</th><th>CPU</th><th>from</th></tr>{rows}</table>"
            + (f"<details><summary>ZeRO-3 settings from the model's shape</summary><table>{derived}</table>"
               "</details>" if derived else ""))  # fmt: skip


def fit_html(plan: Any) -> str:
    """The candidates of a launch that fits itself (fit.Plan): estimates, the choice, why."""
    rows = "".join(
        f"<tr{' style=font-weight:bold' if r['chosen'] else ''}><td>{r['zero_stage']}</td><td>{r['offload']}</td>"
        f"<td>{gib_text(r['device_gib'])}</td><td>{gib_text(r['host_gib'])}</td><td>{gib_text(r['nvme_gib'])}</td>"
        f"<td>{html.escape(r['why'])}{' (chosen)' if r['chosen'] else ''}</td></tr>"
        for r in plan.rows()
    )
    tips = "; ".join(plan.suggestions)
    return (f"<h4>ZeRO stage and offload</h4><p>{html.escape(plan.reason)}</p><table><tr><th>stage</th>"
            "<th>offload</th><th>device/rank</th><th>host/rank</th><th>NVMe/rank</th><th></th></tr>"
            f"{rows}</table>" + (f"<p>would fit: {html.escape(tips)}</p>" if tips else ""))  # fmt: skip


def dry_run_html(d: DryRun) -> str:
    checks = "".join(
        f"<tr><td>{'✅' if c.ok else '❌'}</td><td>{html.escape(c.name)}</td><td>{html.escape(c.detail)}</td></tr>"
        for c in d.checks
    )
    mem = memory_html(d.memory, d.memory_error)
    if d.fit is not None:
        mem += fit_html(d.fit)
    return (
        f"<h4>Dry run: {'ready' if d.ok else 'NOT ready'}</h4><table>{checks}</table>"
        f"<h4>Command ({d.ranks} rank(s))</h4>{_commands_html(d)}{mem}"
        f"<details><summary>spec</summary><pre>{html.escape(d.spec.to_yaml())}</pre></details>"
        f"<details><summary>DeepSpeed config</summary><pre>{html.escape(json.dumps(d.ds_config, indent=2))}</pre></details>"
    )


def _commands_html(d: Any) -> str:
    import shlex

    if not d.commands:
        return f"<pre>{html.escape(' '.join(d.command))}</pre>"
    out = ""
    for c in d.commands:
        out += f"<div><i>{html.escape(c.where)}</i></div><pre style='white-space:pre-wrap'>{html.escape(shlex.join(c.argv))}</pre>"
        if c.script:
            out += f"<pre style='white-space:pre-wrap'>{html.escape(c.script)}</pre>"
    return out
