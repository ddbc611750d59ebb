// The live panel: GET /v1/metrics every 2 s, drawn into the elements of #live in index.html,
// with a sparkline of the engine's recent tokens/s.

import { fetchMetrics, ApiError } from './api.js';
import { formatNumber } from './dom.js';

const REFRESH_MS = 2000;
const HISTORY = 60; // samples in the sparkline: two minutes at one every 2 s
const SVG_NS = 'http://www.w3.org/2000/svg';

const $ = (id) => document.getElementById(id);

function setBar(id, fraction) {
  const bar = $(id);
  const f = Number.isFinite(fraction) ? Math.min(1, Math.max(0, fraction)) : 0;
  bar.style.width = `${(f * 100).toFixed(1)}%`;
  // Colour shifts as a resource fills, so a full KV cache or a hot GPU stands out at a glance.
  bar.dataset.level = f > 0.9 ? 'high' : f > 0.7 ? 'mid' : 'low';
}

function gb(mb) {
  return formatNumber(Number(mb) / 1024, 1);
}

/** Draws `values` as a line over a soft area into the <svg> #live-spark. */
function drawSparkline(svg, values) {
  const w = 200;
  const h = 40;
  const max = Math.max(1, ...values) * 1.15;
  const step = w / (HISTORY - 1);
  // Fills from the left while history builds up, then scrolls with the newest on the right.
  const points = values.map((v, i) => [i * step, h - (v / max) * (h - 2) - 1]);
  const xEnd = points.length ? points[points.length - 1][0] : 0;
  svg.replaceChildren();
  if (points.length < 2) return;
  const line = points.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(' ');
  const area = document.createElementNS(SVG_NS, 'polygon');
  area.setAttribute('points', `0,${h} ${line} ${xEnd},${h}`);
  area.setAttribute('class', 'spark-area');
  const poly = document.createElementNS(SVG_NS, 'polyline');
  poly.setAttribute('points', line);
  poly.setAttribute('class', 'spark-line');
  svg.append(area, poly);
}

export class LivePanel {
  /** onFailure(err) is told about failed fetches, so the app can re-check readiness. */
  constructor({ onFailure = () => {} } = {}) {
    this.onFailure = onFailure;
    this.history = [];
    this.timer = null;
    this.inFlight = false;
  }

  start() {
    this.tick();
  }

  /** Fetch now (e.g. after the API key changed) instead of waiting for the next tick. */
  refresh() {
    clearTimeout(this.timer);
    this.tick();
  }

  async tick() {
    if (this.inFlight) return;
    this.inFlight = true;
    try {
      // A hidden tab skips fetches: nobody is looking, and it spares the server.
      if (!document.hidden) this.show(await fetchMetrics());
    } catch (err) {
      this.showError(err);
      this.onFailure(err);
    } finally {
      this.inFlight = false;
      this.timer = setTimeout(() => this.tick(), REFRESH_MS);
    }
  }

  show(m) {
    const live = $('live');
    live.dataset.state = 'ok';
    $('live-status').textContent = 'live';
    $('live-status').title = `Updated ${new Date((m.timestamp || Date.now() / 1000) * 1000).toLocaleTimeString()}`;

    const cpu = m.cpu || {};
    $('live-cpu').textContent = `${formatNumber(cpu.utilization_percent, 0)} %`;
    $('live-cpu').title = `${cpu.core_count ?? '?'} cores`;
    setBar('live-cpu-bar', cpu.utilization_percent / 100);

    const mem = m.memory || {};
    $('live-mem').textContent = `${gb(mem.used_mb)} / ${gb(mem.total_mb)} GB`;
    setBar('live-mem-bar', mem.used_mb / mem.total_mb);

    const gpu = m.gpu;
    $('live-gpu-row').hidden = !gpu;
    if (gpu) {
      $('live-gpu-label').textContent = `GPU ${gpu.device_id ?? ''}`.trim();
      const temp = gpu.temperature_celsius == null ? '' : ` · ${formatNumber(gpu.temperature_celsius, 0)} °C`;
      $('live-gpu').textContent = `${formatNumber(gpu.utilization_percent, 0)} %${temp}`;
      $('live-gpu-mem').textContent = `${gb(gpu.memory_used_mb)} / ${gb(gpu.memory_total_mb)} GB`;
      setBar('live-gpu-bar', gpu.memory_used_mb / gpu.memory_total_mb);
    }

    const e = m.engine || {};
    $('live-running').textContent = String(e.running ?? '–');
    $('live-waiting').textContent = String(e.waiting ?? '–');
    // kv_cache_usage_perc follows vLLM's gauge of the same name: a fraction, 1.0 = full.
    $('live-kv').textContent = `${formatNumber((e.kv_cache_usage_perc ?? NaN) * 100, 1)} %`;
    setBar('live-kv-bar', e.kv_cache_usage_perc);
    $('live-tps').textContent = formatNumber(e.tokens_per_second, 1);
    $('live-requests').textContent = String(e.requests_total ?? '–');
    $('live-prompt-total').textContent = String(e.prompt_tokens_total ?? '–');
    $('live-gen-total').textContent = String(e.generation_tokens_total ?? '–');
    $('live-error').hidden = true;

    this.history.push(Number(e.tokens_per_second) || 0);
    if (this.history.length > HISTORY) this.history.shift();
    drawSparkline($('live-spark'), this.history);
  }

  showError(err) {
    const live = $('live');
    live.dataset.state = 'error';
    $('live-status').textContent = 'offline';
    const box = $('live-error');
    box.hidden = false;
    box.textContent =
      err instanceof ApiError && err.status === 401
        ? 'Unauthorized (401): set the API key in Settings.'
        : `No metrics: ${err.message}`;
  }
}
