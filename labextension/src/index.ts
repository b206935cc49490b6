import { ILabShell, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette, MainAreaWidget } from '@jupyterlab/apputils';
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { LabIcon } from '@jupyterlab/ui-components';
import { Widget } from '@lumino/widgets';

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

/** A run as GET /jupyter-llm/api/runs lists it. */
interface IRunRow {
  run_id: string;
  name: string | null;
  job: string;
  state: string;
  step: number;
  total: number | null;
  loss: number | null;
  val_loss: number | null;
  error: string | null;
  restarts: number;
  last_restart: { reason?: string; class?: string } | null;
  startup: { phase: string; detail: string } | null;
  sweep: { sweep_id?: string; trial?: number } | null;
  pipeline: { pipeline?: string } | null;
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

interface IGenerationDone {
  done: true;
  pieces?: number;
  seconds?: number;
  stopped?: boolean;
  error?: string;
}

/** POST a generation request and hand each streamed piece to `onText` as it arrives. */
async function streamGeneration(
  path: string,
  body: Record<string, unknown>,
  onText: (piece: string) => void,
  onDone: (done: IGenerationDone) => void
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
          onDone(msg as IGenerationDone);
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

/** The left sidebar: every run, grouped by sweep and pipeline, polled with back-off. */
class RunsSidebar extends Widget {
  intervalMs = 2000;
  private backoff = 1;
  private timer: number | undefined;
  private lastSignature = '';
  readonly metrics = new MetricsCache();
  rows: IRunRow[] = [];

  constructor(private readonly openRun: (runId: string) => void) {
    super();
    this.id = 'jupyter-llm-runs';
    this.addClass('jp-llm-sidebar');
    this.title.icon = icon;
    this.title.caption = 'LLM runs';
    this.node.appendChild(el('h3', '', 'LLM runs'));
    this.node.appendChild(el('div', 'jp-llm-list'));
    void this.poll();
  }

  dispose(): void {
    window.clearTimeout(this.timer);
    super.dispose();
  }

  async refresh(): Promise<boolean> {
    const reply = await api<{ runs: IRunRow[] }>('runs');
    this.rows = reply.runs;
    const live = this.rows.filter((r) => !TERMINAL.includes(r.state));
    await Promise.all(live.map((r) => this.metrics.update(r.run_id)));
    for (const r of this.rows) {
      if (TERMINAL.includes(r.state) && this.metrics.get(r.run_id).length === 0) {
        await this.metrics.update(r.run_id); // a finished run's curve, once
      }
    }
    const signature = JSON.stringify(this.rows.map((r) => [r.run_id, r.state, r.step, r.loss]));
    const changed = signature !== this.lastSignature;
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
      list.appendChild(el('div', 'jp-llm-meta', 'no runs yet'));
      return;
    }
    const groups = new Map<string, IRunRow[]>();
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

  private row(r: IRunRow): HTMLElement {
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
      const run = await api<IRunRow>(`runs/${encodeURIComponent(this.runId)}`);
      const metrics = await this.sidebar.metrics.update(this.runId);
      const logs = await api<{ lines: string[] }>(
        `runs/${encodeURIComponent(this.runId)}/logs?rank=0&n=20`
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

  private render(run: IRunRow, metrics: IMetric[], logs: string[]): void {
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
    const curve = el('div', '');
    curve.innerHTML =
      svgLine(series(metrics, 'loss'), 480, 160, 'jp-llm-curve', '#1565c0') +
      svgLine(series(metrics, 'val_loss'), 480, 160, 'jp-llm-curve-val', '#c62828');
    this.body.appendChild(curve);
    const last = [...metrics].reverse().find((m) => typeof m.loss === 'number');
    if (last) {
      const table = el('table', 'jp-llm-metrics');
      for (const key of ['step', 'loss', 'lr', 'grad_norm', 'tokens_per_s', 'mem_mb']) {
        const tr = el('tr', '');
        const v = last[key];
        tr.append(
          el('th', '', key),
          el('td', '', v === undefined ? '–' : String(+v.toPrecision(5)))
        );
        table.appendChild(tr);
      }
      this.body.appendChild(table);
    }
    this.body.appendChild(el('pre', 'jp-llm-logs', logs.join('\n')));
  }
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: PLUGIN_ID,
  description: 'A sidebar of jupyter-llm training runs',
  autoStart: true,
  requires: [ILabShell],
  optional: [ICommandPalette, ISettingRegistry],
  activate: (
    app: JupyterFrontEnd,
    shell: ILabShell,
    palette: ICommandPalette | null,
    settings: ISettingRegistry | null
  ) => {
    const panels = new Map<string, MainAreaWidget<RunPanel>>();
    const openRun = (runId: string): void => {
      let panel = panels.get(runId);
      if (!panel || panel.isDisposed) {
        panel = new MainAreaWidget({ content: new RunPanel(runId, sidebar) });
        panel.title.label = runId;
        panel.title.icon = icon;
        panels.set(runId, panel);
        shell.add(panel, 'main');
      }
      shell.activateById(panel.id);
    };
    const sidebar = new RunsSidebar(openRun);
    shell.add(sidebar, 'left', { rank: 850 });

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
