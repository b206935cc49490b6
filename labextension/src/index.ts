import {
  ILabShell,
  ILayoutRestorer,
  JupyterFrontEnd,
  JupyterFrontEndPlugin
} from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget, WidgetTracker } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

import type { Comparison, GenerationDone, RunDetail, RunList, RunRow } from './api';

const PLUGIN_ID = 'jupyter-llm:plugin';
const STATE_COLORS: Record<string, string> = {
  completed: '#2e7d32',
  failed: '#c62828',
  stopped: '#6d4c41',
  running: '#1565c0',
  starting: '#6a1b9a',
  resuming: '#6a1b9a',
  stopping: '#c2410c',
  created: '#616161',
  damaged: '#ad1457'
};
// the runs' colours of the notebook widgets (jupyter_llm.display.PALETTE): 3:1 in both themes
const CHART_COLORS = ['#3d7fd9', '#e0453a', '#2e9e44', '#9b5fd6'];
const TERMINAL = ['completed', 'failed', 'stopped', 'damaged'];
const MAX_BACKOFF = 8;

const icon = new LabIcon({
  name: 'jupyter-llm:runs',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24"><polyline class="jp-icon3" ' +
    'fill="none" stroke="#616161" stroke-width="2" points="2,20 7,12 12,15 17,6 22,9"/></svg>'
});

/** "preparing data: tokenizing 45%" */
function startupText(s: { phase: string; detail: string }): string {
  return s.detail ? `${s.phase}: ${s.detail}` : s.phase;
}

interface IMetric {
  step: number;
  loss?: number;
  val_loss?: number;
  [key: string]: number | undefined;
}

/** A call to the runs API through the server connection (token and XSRF handled there). */
async function api<T>(path: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'jupyter-llm/api', path);
  const response = await ServerConnection.makeRequest(url, init, settings);
  const data = await response.json();
  if (!response.ok) {
    throw new Error(data.message || response.statusText);
  }
  return data as T;
}

/** POST a generation request and hand each streamed piece to `onText` as it arrives. */
async function streamGeneration(
  path: string,
  body: Record<string, unknown>,
  onText: (piece: string) => void,
  onDone: (done: GenerationDone) => void
): Promise<void> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'jupyter-llm/api', path);
  const response = await ServerConnection.makeRequest(
    url,
    { method: 'POST', body: JSON.stringify(body) },
    settings
  );
  if (!response.ok || !response.body) {
    const data = await response.json();
    throw new Error(data.message || response.statusText);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) {
      break;
    }
    buffer += decoder.decode(value, { stream: true });
    let nl: number;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      if (line) {
        const msg = JSON.parse(line);
        if (msg.done) {
          onDone(msg as GenerationDone);
        } else if (typeof msg.text === 'string') {
          onText(msg.text);
        }
      }
    }
  }
}

/** The training losses of a run, fetched incrementally by byte offset. */
class MetricsCache {
  private offsets = new Map<string, number>();
  private lines = new Map<string, IMetric[]>();

  async update(runId: string): Promise<IMetric[]> {
    const offset = this.offsets.get(runId) ?? 0;
    const reply = await api<{ metrics: IMetric[]; offset: number }>(
      `runs/${encodeURIComponent(runId)}/metrics?offset=${offset}`
    );
    const all = (this.lines.get(runId) ?? []).concat(reply.metrics);
    this.lines.set(runId, all);
    this.offsets.set(runId, reply.offset);
    return all;
  }

  get(runId: string): IMetric[] {
    return this.lines.get(runId) ?? [];
  }
}

/** SVG polyline points scaled into a w×h box (y grows downwards). */
function points(values: [number, number][], w: number, h: number): string {
  if (values.length === 0) {
    return '';
  }
  const xs = values.map((v) => v[0]);
  const ys = values.map((v) => v[1]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  const [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  return values
    .map(([x, y]) => {
      const px = x1 > x0 ? ((x - x0) / (x1 - x0)) * w : 0;
      const py = y1 > y0 ? h - ((y - y0) / (y1 - y0)) * h : h / 2;
      return `${px.toFixed(1)},${py.toFixed(1)}`;
    })
    .join(' ');
}

function series(metrics: IMetric[], key: string): [number, number][] {
  const byStep = new Map<number, number>();
  for (const m of metrics) {
    const v = m[key];
    if (typeof v === 'number') {
      byStep.set(m.step, v);
    }
  }
  return [...byStep.entries()].sort((a, b) => a[0] - b[0]);
}

function el(tag: string, cls: string, text?: string): HTMLElement {
  const e = document.createElement(tag);
  if (cls) {
    e.className = cls;
  }
  if (text !== undefined) {
    e.textContent = text;
  }
  return e;
}

function svgLine(
  values: [number, number][],
  w: number,
  h: number,
  cls: string,
  color: string
): string {
  return `<svg class="${cls}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}"><polyline fill="none" stroke="${color}" stroke-width="1.5" points="${points(values, w, h)}"/></svg>`;
}

interface ISeries {
  label: string;
  color: string;
  values: [number, number][];
  dashed?: boolean;
  cls?: string;
}

/** A number on an axis, with the digits its axis' span needs (550.2 and 550.8 stay apart),
 * SI-style thousands (12.3k) and exponents for small values. */
function tick(v: number, span = 0): string {
  const a = Math.abs(v);
  const digits = Math.min(
    8,
    Math.max(3, span > 0 && a > 0 ? Math.ceil(Math.log10(a / span)) + 2 : 3)
  );
  if (a >= 1e6) {
    return `${+(v / 1e6).toPrecision(digits)}M`;
  }
  if (a >= 1e4) {
    return `${+(v / 1e3).toPrecision(digits)}k`;
  }
  if (a !== 0 && a < 1e-2) {
    return v.toExponential(Math.max(1, digits - 2));
  }
  return String(+v.toPrecision(digits));
}

/** A titled line chart with both axes (ticks and labels) and a legend, as SVG text. Colours
 * and text take the theme's variables; each series keeps its own colour. */
function svgChart(
  all: ISeries[],
  opts: {
    title: string;
    xlabel: string;
    ylabel: string;
    width: number;
    height: number;
    cls: string;
  }
): string {
  const { width: w, height: h } = opts;
  const m = { left: 56, right: 12, top: 22, bottom: 34 };
  const shown = all.filter((s) => s.values.length > 0);
  const xs = shown.flatMap((s) => s.values.map((p) => p[0]));
  const ys = shown.flatMap((s) => s.values.map((p) => p[1]));
  const esc = (t: string): string =>
    t.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
  const text = 'fill="var(--jp-ui-font-color1)" font-size="11"';
  let out = `<svg class="jp-llm-chart ${opts.cls}" width="${w}" height="${h}" viewBox="0 0 ${w} ${h}" role="img" aria-label="${esc(opts.title)}">`;
  out += `<text class="jp-llm-chart-title" x="${w / 2}" y="14" text-anchor="middle" ${text} font-weight="600">${esc(opts.title)}</text>`;
  if (xs.length === 0) {
    return (
      out +
      `<text x="${w / 2}" y="${h / 2}" text-anchor="middle" ${text}>no points yet</text></svg>`
    );
  }
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (y1 === y0) {
    [y0, y1] = [y0 - (Math.abs(y0) || 1) * 0.05, y1 + (Math.abs(y1) || 1) * 0.05];
  }
  const px = (x: number): number => m.left + ((x - x0) / (x1 - x0 || 1)) * (w - m.left - m.right);
  const py = (y: number): number => h - m.bottom - ((y - y0) / (y1 - y0)) * (h - m.top - m.bottom);
  const axis = 'stroke="var(--jp-ui-font-color2)" stroke-width="1"';
  out += `<line ${axis} x1="${m.left}" y1="${h - m.bottom}" x2="${w - m.right}" y2="${h - m.bottom}"/>`;
  out += `<line ${axis} x1="${m.left}" y1="${m.top}" x2="${m.left}" y2="${h - m.bottom}"/>`;
  for (let i = 0; i <= 3; i++) {
    const yv = y0 + ((y1 - y0) * i) / 3;
    const xv = x0 + ((x1 - x0) * i) / 3;
    out += `<text class="jp-llm-tick" x="${m.left - 4}" y="${py(yv) + 4}" text-anchor="end" ${text}>${tick(yv, y1 - y0)}</text>`;
    out += `<text class="jp-llm-tick" x="${px(xv)}" y="${h - m.bottom + 14}" text-anchor="middle" ${text}>${tick(Math.round(xv))}</text>`;
  }
  out += `<text class="jp-llm-axis-label" x="${(m.left + w - m.right) / 2}" y="${h - 4}" text-anchor="middle" ${text}>${esc(opts.xlabel)}</text>`;
  out += `<text class="jp-llm-axis-label" transform="translate(12 ${(m.top + h - m.bottom) / 2}) rotate(-90)" text-anchor="middle" ${text}>${esc(opts.ylabel)}</text>`;
  let lx = m.left + 8;
  for (const s of shown) {
    const pts = s.values.map(([x, y]) => `${px(x).toFixed(1)},${py(y).toFixed(1)}`).join(' ');
    const dash = s.dashed ? ' stroke-dasharray="5 3"' : '';
    out += `<polyline class="${s.cls ?? ''}" fill="none" stroke="${s.color}" stroke-width="1.8"${dash} points="${pts}"/>`;
    out += `<line x1="${lx}" y1="${m.top + 6}" x2="${lx + 16}" y2="${m.top + 6}" stroke="${s.color}" stroke-width="2"${dash}/>`;
    out += `<text class="jp-llm-legend" x="${lx + 20}" y="${m.top + 10}" ${text}>${esc(s.label)}</text>`;
    lx += 28 + 7 * s.label.length;
  }
  return out + '</svg>';
}

const METRIC_NAMES: Record<string, string> = {
  step: 'step',
  loss: 'loss',
  val_loss: 'val loss',
  lr: 'learning rate',
  grad_norm: 'grad norm',
  tokens_per_s: 'tokens/s',
  mfu: 'MFU',
  mem_mb: 'memory (MB)'
};

/** The left sidebar: every run, grouped by sweep and pipeline, polled with back-off. */
class RunsSidebar extends Widget {
  intervalMs = 2000;
  private backoff = 1;
  private timer: number | undefined;
  private lastSignature = '';
  readonly metrics = new MetricsCache();
  rows: RunRow[] = [];
  readonly picked = new Set<string>(); // runs ticked for comparing
  private readonly compareButton: HTMLButtonElement;

  constructor(
    private readonly openRun: (runId: string) => void,
    private readonly openCompare: (runIds: string[]) => void
  ) {
    super();
    this.id = 'jupyter-llm-runs';
    this.addClass('jp-llm-sidebar');
    this.title.icon = icon;
    this.title.caption = 'LLM runs';
    this.node.appendChild(el('h3', '', 'LLM runs'));
    this.compareButton = el(
      'button',
      'jp-mod-styled jp-llm-compare',
      'Compare'
    ) as HTMLButtonElement;
    this.compareButton.title = 'tick two or more runs, then compare them';
    this.compareButton.onclick = () => this.openCompare([...this.picked]);
    this.node.appendChild(this.compareButton);
    this.node.appendChild(el('div', 'jp-llm-list'));
    this.updateCompare();
    void this.poll();
  }

  private updateCompare(): void {
    const n = this.picked.size;
    this.compareButton.disabled = n < 2;
    this.compareButton.textContent = n >= 2 ? `Compare ${n} runs` : 'Compare (tick 2+ runs)';
  }

  dispose(): void {
    window.clearTimeout(this.timer);
    super.dispose();
  }

  async refresh(): Promise<boolean> {
    const reply = await api<RunList>('runs');
    this.rows = reply.runs;
    const live = this.rows.filter((r) => !TERMINAL.includes(r.state));
    await Promise.all(live.map((r) => this.metrics.update(r.run_id)));
    for (const r of this.rows) {
      if (TERMINAL.includes(r.state) && this.metrics.get(r.run_id).length === 0) {
        await this.metrics.update(r.run_id); // a finished run's curve, once
      }
    }
    const signature = JSON.stringify(
      this.rows.map((r) => [r.run_id, r.state, r.step, r.loss, r.startup?.phase])
    );
    // a live run keeps the polling at its interval (its start-up phases change without a step)
    const changed = signature !== this.lastSignature || live.length > 0;
    this.lastSignature = signature;
    this.render();
    return changed;
  }

  private async poll(): Promise<void> {
    let changed = true;
    try {
      changed = await this.refresh();
    } catch (e) {
      this.setMessage(`could not list runs: ${(e as Error).message}`);
    }
    // idle: poll less often, up to MAX_BACKOFF times the interval; any change resets it
    this.backoff = changed ? 1 : Math.min(MAX_BACKOFF, this.backoff * 2);
    this.timer = window.setTimeout(() => void this.poll(), this.intervalMs * this.backoff);
  }

  private setMessage(text: string): void {
    const list = this.node.querySelector('.jp-llm-list') as HTMLElement;
    list.textContent = text;
  }

  private render(): void {
    const list = this.node.querySelector('.jp-llm-list') as HTMLElement;
    list.textContent = '';
    if (this.rows.length === 0) {
      list.appendChild(
        el(
          'div',
          'jp-llm-meta jp-llm-empty',
          'No runs yet. Start one from a notebook with %%llm_train (or SpecForm()), ' +
            'or in a terminal with `jupyter-llm train spec.yaml`; it appears here at once.'
        )
      );
      return;
    }
    const groups = new Map<string, RunRow[]>();
    for (const r of [...this.rows].reverse()) {
      const key = r.sweep?.sweep_id
        ? `sweep ${r.sweep.sweep_id}`
        : r.pipeline?.pipeline
          ? `pipeline ${r.pipeline.pipeline.split('/').pop()}`
          : 'runs';
      groups.set(key, [...(groups.get(key) ?? []), r]);
    }
    for (const [group, rows] of groups) {
      list.appendChild(el('div', 'jp-llm-group', group));
      for (const r of rows) {
        list.appendChild(this.row(r));
      }
    }
  }

  private row(r: RunRow): HTMLElement {
    const row = el('div', 'jp-llm-run');
    row.dataset.runId = r.run_id;
    row.dataset.state = r.state;
    row.title = r.error ? `${r.run_id}\n${r.error}` : r.run_id;
    const dot = el('span', 'jp-llm-dot');
    dot.style.background = STATE_COLORS[r.state] ?? '#616161';
    row.appendChild(dot);
    row.appendChild(el('span', 'jp-llm-name', r.name ?? r.run_id));
    const spark = el('span', '');
    const losses = series(this.metrics.get(r.run_id), 'loss').slice(-60);
    spark.innerHTML = svgLine(losses, 60, 16, 'jp-llm-spark', '#1565c0');
    row.appendChild(spark);
    const bar = el('div', 'jp-llm-progress');
    const fill = el('div', '');
    fill.style.width = `${r.total ? Math.min(100, (100 * r.step) / r.total) : 0}%`;
    bar.appendChild(fill);
    row.appendChild(bar);
    const loss = r.loss === null ? '' : ` · loss ${r.loss.toFixed(4)}`;
    // until the first metric, what the run is doing instead of "running · step 0/…"
    const meta = r.startup
      ? startupText(r.startup)
      : `${r.state} · step ${r.step}/${r.total ?? '?'}${loss}`;
    row.appendChild(el('span', 'jp-llm-meta', meta));
    const pick = el('input', 'jp-llm-pick') as HTMLInputElement;
    pick.type = 'checkbox';
    pick.title = 'compare this run with others';
    pick.checked = this.picked.has(r.run_id);
    pick.onclick = (e) => {
      e.stopPropagation(); // ticking is not opening
      if (pick.checked) {
        this.picked.add(r.run_id);
      } else {
        this.picked.delete(r.run_id);
      }
      this.updateCompare();
    };
    row.insertBefore(pick, row.firstChild);
    row.onclick = () => this.openRun(r.run_id);
    return row;
  }
}

/** A main-area panel per run: loss curves, latest metrics, log tail, Stop and Resume; and,
 * once the run has a final model, "Try it": a prompt answered by the run's model, streamed
 * from the server's generator (POST runs/ID/generate, JSON lines). */
class RunPanel extends Widget {
  private timer: number | undefined;
  private readonly body = el('div', 'jp-llm-panel-body');
  // the log lives outside the body that each refresh rebuilds: its search box keeps its text and focus
  private readonly logBox = el('div', 'jp-llm-logbox');
  private readonly logSearch = el('input', 'jp-llm-log-search') as HTMLInputElement;
  private readonly logNote = el('span', 'jp-llm-meta');
  private readonly logPre = el('pre', 'jp-llm-logs');
  private logLines: string[] = [];
  private tryIt: HTMLElement | null = null;

  constructor(
    readonly runId: string,
    private readonly sidebar: RunsSidebar
  ) {
    super();
    this.addClass('jp-llm-panel');
    this.node.dataset.runId = runId;
    this.id = `jupyter-llm-run-${runId}`;
    this.title.label = runId;
    this.title.closable = true;
    this.node.appendChild(this.body);
    this.logSearch.type = 'search';
    this.logSearch.placeholder = 'search the log (case-insensitive)';
    this.logSearch.oninput = () => this.drawLog();
    this.logBox.append(el('h3', '', 'Log (rank 0)'), this.logSearch, this.logNote, this.logPre);
    this.node.appendChild(this.logBox);
    void this.update_();
  }

  dispose(): void {
    window.clearTimeout(this.timer);
    super.dispose();
  }

  private async act(action: 'stop' | 'resume'): Promise<void> {
    try {
      await api(`runs/${encodeURIComponent(this.runId)}/${action}`, { method: 'POST' });
    } catch (e) {
      window.alert(`${action}: ${(e as Error).message}`);
    }
    await this.update_();
  }

  private async update_(): Promise<void> {
    window.clearTimeout(this.timer);
    let state = '';
    try {
      const run = await api<RunDetail>(`runs/${encodeURIComponent(this.runId)}`);
      const metrics = await this.sidebar.metrics.update(this.runId);
      const logs = await api<{ lines: string[] }>(
        `runs/${encodeURIComponent(this.runId)}/logs?rank=0&n=400`
      );
      state = run.state;
      this.render(run, metrics, logs.lines);
    } catch (e) {
      this.body.textContent = `could not read run ${this.runId}: ${(e as Error).message}`;
    }
    if (state === 'completed' && !this.tryIt) {
      this.tryIt = this.tryBox();
      this.node.appendChild(this.tryIt);
    }
    if (!TERMINAL.includes(state)) {
      this.timer = window.setTimeout(() => void this.update_(), this.sidebar.intervalMs);
    }
  }

  /** The log's newest lines, only those holding the search text when there is one. */
  private drawLog(): void {
    const needle = this.logSearch.value.trim().toLowerCase();
    const shown = needle
      ? this.logLines.filter((l) => l.toLowerCase().includes(needle))
      : this.logLines.slice(-40);
    this.logNote.textContent = needle
      ? ` ${shown.length} of ${this.logLines.length} lines hold “${needle}”`
      : ` the newest ${shown.length} of ${this.logLines.length} lines`;
    this.logPre.textContent = shown.join('\n');
  }

  /** The "Try it" box: prompt, temperature, max new tokens, Generate and Stop. */
  private tryBox(): HTMLElement {
    const box = el('div', 'jp-llm-try');
    box.appendChild(el('h3', '', 'Try it'));
    const prompt = el('textarea', 'jp-llm-try-prompt') as HTMLTextAreaElement;
    prompt.placeholder = 'a prompt for the final model';
    const temp = el('input', 'jp-llm-try-temperature') as HTMLInputElement;
    temp.type = 'number';
    temp.step = '0.1';
    temp.min = '0';
    temp.value = '0.8';
    temp.title = 'temperature (0: greedy)';
    const maxNew = el('input', 'jp-llm-try-max-new') as HTMLInputElement;
    maxNew.type = 'number';
    maxNew.min = '1';
    maxNew.value = '64';
    maxNew.title = 'max new tokens';
    const go = el(
      'button',
      'jp-mod-styled jp-mod-accept jp-llm-try-generate',
      'Generate'
    ) as HTMLButtonElement;
    const stop = el('button', 'jp-mod-styled jp-llm-try-stop', 'Stop') as HTMLButtonElement;
    stop.disabled = true;
    const output = el('pre', 'jp-llm-try-output');
    const stats = el('div', 'jp-llm-meta jp-llm-try-stats');
    const row = el('div', 'jp-llm-try-row');
    row.append(
      el('label', '', 'temperature '),
      temp,
      el('label', '', ' max new '),
      maxNew,
      go,
      stop
    );
    box.append(prompt, row, output, stats);
    const url = `runs/${encodeURIComponent(this.runId)}/generate`;
    go.onclick = async () => {
      go.disabled = true;
      stop.disabled = false;
      output.textContent = prompt.value;
      stats.textContent = 'generating…';
      try {
        await streamGeneration(
          url,
          {
            prompt: prompt.value,
            temperature: +temp.value,
            max_new_tokens: +maxNew.value,
            seed: 0
          },
          (piece) => (output.textContent += piece),
          (done) => {
            stats.textContent = done.error
              ? `error: ${done.error}`
              : `${done.stopped ? 'stopped · ' : ''}${done.pieces} pieces in ${done.seconds} s`;
          }
        );
      } catch (e) {
        stats.textContent = `error: ${(e as Error).message}`;
      }
      go.disabled = false;
      stop.disabled = true;
    };
    stop.onclick = () => void api(url, { method: 'POST', body: JSON.stringify({ stop: true }) });
    return box;
  }

  private render(run: RunDetail, metrics: IMetric[], logs: string[]): void {
    this.title.label = run.name ?? run.run_id; // the tab: the run's name; its id on hover
    this.title.caption = run.run_id;
    this.body.textContent = '';
    const head = el('h2', '', `${run.name ?? ''} `);
    const badge = el('span', 'jp-llm-state', run.startup ? run.startup.phase : run.state);
    badge.dataset.state = run.state;
    badge.style.background = STATE_COLORS[run.state] ?? '#616161';
    head.appendChild(badge);
    this.body.appendChild(head);
    this.body.appendChild(
      el('div', 'jp-llm-meta', `${run.run_id} · step ${run.step}/${run.total ?? '?'}`)
    );
    if (run.startup) {
      this.body.appendChild(el('div', 'jp-llm-startup', startupText(run.startup)));
    }
    if (run.error) {
      this.body.appendChild(el('div', 'jp-llm-error', run.error));
    }
    if (run.restarts) {
      const why = run.last_restart?.reason ?? '';
      this.body.appendChild(
        el(
          'div',
          'jp-llm-meta jp-llm-restarts',
          `restarted ${run.restarts}× automatically (last: ${why})`
        )
      );
    }
    const stop = el('button', 'jp-mod-styled jp-llm-stop', 'Stop') as HTMLButtonElement;
    stop.disabled = TERMINAL.includes(run.state);
    stop.onclick = () => void this.act('stop');
    const resume = el('button', 'jp-mod-styled jp-llm-resume', 'Resume') as HTMLButtonElement;
    resume.disabled = !TERMINAL.includes(run.state) || run.state === 'completed';
    resume.onclick = () => void this.act('resume');
    const buttons = el('div', '');
    buttons.append(stop, resume);
    this.body.appendChild(buttons);
    const charts = el('div', 'jp-llm-charts');
    const size = { width: 460, height: 200 };
    charts.innerHTML =
      svgChart(
        [
          {
            label: 'train',
            color: CHART_COLORS[0],
            values: series(metrics, 'loss'),
            cls: 'jp-llm-curve'
          },
          {
            label: 'validation',
            color: CHART_COLORS[1],
            values: series(metrics, 'val_loss'),
            dashed: true,
            cls: 'jp-llm-curve-val'
          }
        ],
        { title: 'loss', xlabel: 'step', ylabel: 'loss', cls: 'jp-llm-chart-loss', ...size }
      ) +
      (
        [
          ['lr', 'learning rate', 'lr'],
          ['grad_norm', 'gradient norm', 'norm'],
          ['tokens_per_s', 'throughput', 'tokens/s'],
          ['mem_mb', 'memory', 'MB']
        ] as const
      )
        .map(([key, title, ylabel]) =>
          svgChart(
            [{ label: run.name ?? 'run', color: CHART_COLORS[0], values: series(metrics, key) }],
            {
              title,
              xlabel: 'step',
              ylabel,
              cls: `jp-llm-chart-${key}`,
              ...size
            }
          )
        )
        .join('');
    this.body.appendChild(charts);
    const last = [...metrics].reverse().find((m) => typeof m.loss === 'number');
    const lastVal = [...metrics].reverse().find((m) => typeof m.val_loss === 'number');
    if (last) {
      const table = el('table', 'jp-llm-metrics');
      for (const key of Object.keys(METRIC_NAMES)) {
        const v = key === 'val_loss' ? lastVal?.val_loss : last[key];
        const tr = el('tr', '');
        tr.append(
          el('th', '', METRIC_NAMES[key]),
          el(
            'td',
            '',
            typeof v !== 'number'
              ? '–'
              : key === 'mfu'
                ? `${(100 * v).toFixed(1)}%`
                : String(+v.toPrecision(5))
          )
        );
        table.appendChild(tr);
      }
      this.body.appendChild(table);
    }
    if (run.samples && run.samples.length > 0) {
      this.body.appendChild(el('h3', '', 'Samples while training'));
      const table = el('table', 'jp-llm-samples');
      const head = el('tr', '');
      head.append(el('th', '', 'step'), el('th', '', 'prompt'), el('th', '', 'generated (greedy)'));
      table.appendChild(head);
      for (const s of [...run.samples].reverse()) {
        const tr = el('tr', '');
        tr.append(
          el('td', '', String(s.step)),
          el('td', '', s.prompt),
          el('td', 'jp-llm-sample', s.output)
        );
        table.appendChild(tr);
      }
      this.body.appendChild(table);
    }
    this.logLines = logs;
    this.drawLog();
    if (run.overview) {
      this.body.appendChild(el('h3', '', 'Overview'));
      const table = el('table', 'jp-llm-overview');
      for (const [k, v] of run.overview) {
        const tr = el('tr', '');
        tr.append(el('th', '', k), el('td', '', v));
        table.appendChild(tr);
      }
      this.body.appendChild(table);
    }
  }
}

/** Runs side by side: their curves overlaid (one colour per run), a table of their final and
 * best numbers and evaluations, and where their specs differ (GET compare). */
class ComparePanel extends Widget {
  constructor(
    readonly runIds: string[],
    private readonly sidebar: RunsSidebar
  ) {
    super();
    this.addClass('jp-llm-panel');
    this.addClass('jp-llm-compare-panel');
    this.title.label = `compare ${runIds.length} runs`;
    this.title.closable = true;
    void this.render();
  }

  private async render(): Promise<void> {
    this.node.textContent = '';
    let c: Comparison;
    try {
      c = await api<Comparison>(`compare?runs=${this.runIds.map(encodeURIComponent).join(',')}`);
    } catch (e) {
      this.node.textContent = `could not compare: ${(e as Error).message}`;
      return;
    }
    this.node.appendChild(el('h2', '', `${c.labels.join(' · ')}`));
    const metrics = await Promise.all(this.runIds.map((id) => this.sidebar.metrics.update(id)));
    const color = (i: number): string => CHART_COLORS[i % CHART_COLORS.length];
    const charts = el('div', 'jp-llm-charts');
    charts.innerHTML =
      svgChart(
        c.labels.flatMap((label, i) => [
          {
            label: `${label} train`,
            color: color(i),
            values: series(metrics[i], 'loss'),
            cls: 'jp-llm-curve'
          },
          {
            label: `${label} val`,
            color: color(i),
            values: series(metrics[i], 'val_loss'),
            dashed: true,
            cls: 'jp-llm-curve-val'
          }
        ]),
        {
          title: 'loss',
          xlabel: 'step',
          ylabel: 'loss',
          cls: 'jp-llm-chart-loss',
          width: 640,
          height: 240
        }
      ) +
      svgChart(
        c.labels.map((label, i) => ({ label, color: color(i), values: series(metrics[i], 'lr') })),
        {
          title: 'learning rate',
          xlabel: 'step',
          ylabel: 'lr',
          cls: 'jp-llm-chart-lr',
          width: 460,
          height: 200
        }
      );
    this.node.appendChild(charts);
    const cols = [...c.train_metrics, ...c.metrics];
    const names: Record<string, string> = {
      final_loss: 'final loss',
      best_val_loss: 'best val loss',
      ppl: 'perplexity',
      loss: 'eval loss'
    };
    // a number per row and a run per column: as many columns as runs, however many metrics
    const table = el('table', 'jp-llm-compare-table');
    const head = el('tr', '');
    head.appendChild(el('th', '', ''));
    c.labels.forEach((label, i) => {
      const th = el('th', '');
      const sw = el('span', 'jupyter-llm-swatch', '■ ');
      sw.style.color = color(i);
      th.append(sw, label);
      head.appendChild(th);
    });
    table.appendChild(head);
    for (const k of ['state', 'steps', 'checkpoint', ...cols]) {
      const tr = el('tr', '');
      tr.appendChild(el('th', '', names[k] ?? k));
      for (const r of c.rows) {
        const v = r[k];
        const text =
          typeof v === 'number' && k !== 'steps'
            ? String(+v.toPrecision(4))
            : v === null || v === undefined
              ? k === 'checkpoint' || c.metrics.includes(k)
                ? '– not evaluated'
                : '–'
              : String(v);
        tr.appendChild(el('td', '', text));
      }
      table.appendChild(tr);
    }
    this.node.appendChild(table);
    const keys = Object.keys(c.spec_diff);
    this.node.appendChild(
      el('h3', '', keys.length ? 'Where the specs differ' : 'The specs are the same')
    );
    if (keys.length) {
      const diff = el('table', 'jp-llm-spec-diff');
      const dh = el('tr', '');
      dh.append(el('th', '', 'key'), ...c.labels.map((l) => el('th', '', l)));
      diff.appendChild(dh);
      for (const k of keys) {
        const tr = el('tr', '');
        tr.append(el('td', '', k), ...c.spec_diff[k].map((v) => el('td', '', JSON.stringify(v))));
        diff.appendChild(tr);
      }
      this.node.appendChild(diff);
    }
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'A sidebar of jupyter-llm training runs',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ISettingRegistry, ILayoutRestorer],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    settings: ISettingRegistry | null,
    restorer: ILayoutRestorer | null
  ) => {
    const panels = new Map<string, MainAreaWidget<RunPanel>>();
    // the open run panels come back after a reload (JupyterLab's layout restorer)
    const tracker = new WidgetTracker<MainAreaWidget<RunPanel>>({ namespace: 'jupyter-llm-run' });
    const openRun = (runId: string): void => {
      let panel = panels.get(runId);
      if (!panel || panel.isDisposed) {
        panel = new MainAreaWidget({ content: new RunPanel(runId, sidebar) });
        panel.id = `jupyter-llm-run-panel-${runId}`;
        panel.title.icon = icon;
        panels.set(runId, panel);
        void tracker.add(panel);
        shell.add(panel, 'main');
      }
      shell.activateById(panel.id);
    };
    const openCompare = (runIds: string[]): void => {
      const panel = new MainAreaWidget({ content: new ComparePanel(runIds, sidebar) });
      panel.title.icon = icon;
      shell.add(panel, 'main');
      shell.activateById(panel.id);
    };
    const sidebar = new RunsSidebar(openRun, openCompare);
    shell.add(sidebar, 'left', { rank: 850 });
    if (restorer) {
      void restorer.restore(tracker, {
        command: 'jupyter-llm:open-run',
        args: (panel) => ({ runId: panel.content.runId }),
        name: (panel) => panel.content.runId
      });
      restorer.add(sidebar, sidebar.id);
    }

    app.commands.addCommand('jupyter-llm:open-sidebar', {
      label: 'Show LLM runs',
      execute: () => shell.activateById(sidebar.id)
    });
    app.commands.addCommand('jupyter-llm:refresh', {
      label: 'Refresh LLM runs',
      execute: () => sidebar.refresh()
    });
    app.commands.addCommand('jupyter-llm:open-run', {
      label: 'Open an LLM run',
      execute: (args) => openRun(String(args.runId))
    });
    if (palette) {
      for (const command of ['jupyter-llm:open-sidebar', 'jupyter-llm:refresh']) {
        palette.addItem({ command, category: 'LLM runs' });
      }
    }
    if (settings) {
      void settings.load(PLUGIN_ID).then((s) => {
        const apply = (): void => {
          sidebar.intervalMs = 1000 * (s.get('refreshInterval').composite as number);
        };
        apply();
        s.changed.connect(apply);
      });
    }
  }
};

export default plugin;
