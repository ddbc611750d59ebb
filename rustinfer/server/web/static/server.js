// Whether the server can answer: GET /ready drives the banner (retrying while the server is
// down or loading its model), and GET /v1/models gives the model name shown and sent.

import { ApiError, checkReady, fetchModels } from './api.js';
import { toast } from './dom.js';

const RETRY_MS = 3000; // while the server is down or loading
const RECHECK_MS = 15000; // while it is up: notices a restart without hammering it

const $ = (id) => document.getElementById(id);

function showModel(text, pillState) {
  $('model-name').textContent = text;
  $('model-pill').dataset.state = pillState;
}

export class ServerStatus {
  /** onModel(id) is called when the model name arrives (the page re-labels its answers). */
  constructor({ onModel = () => {} } = {}) {
    this.onModel = onModel;
    this.modelId = null;
    this.readiness = 'unknown';
    this.timer = null;
    this.polling = false;
    this.lastModelError = '';
    $('banner-retry').addEventListener('click', () => this.poll());
  }

  /** Checks /ready now (also when something else saw the server fail) and schedules the next check. */
  async poll() {
    if (this.polling) return; // one check at a time, one timer at a time
    this.polling = true;
    clearTimeout(this.timer);
    let result;
    try {
      result = await checkReady();
    } finally {
      this.polling = false;
    }
    const was = this.readiness;
    this.readiness = result.state;
    const retry = `Retrying every ${RETRY_MS / 1000} s; the page stays usable.`;
    if (result.state === 'ready') {
      $('banner').hidden = true;
      if (was !== 'ready' || !this.modelId) this.loadModel();
    } else if (result.state === 'loading') {
      showModel('loading…', 'loading');
      this.banner(`The server is starting up (loading the model). ${retry}`);
    } else if (result.state === 'down') {
      showModel('offline', 'error');
      this.banner(`Cannot reach the rustinfer server at ${location.host}. ${retry}`);
    } else {
      showModel('not ready', 'error');
      this.banner(`The server is not available: ${result.message}. ${retry}`);
    }
    this.timer = setTimeout(() => this.poll(), result.state === 'ready' ? RECHECK_MS : RETRY_MS);
  }

  banner(text) {
    $('banner-text').textContent = text;
    $('banner').hidden = false;
  }

  /** The model id to send; asks the server when it is not known yet. Throws what the API throws. */
  async ensureModel() {
    if (!this.modelId) await this.loadModel({ quiet: true, rethrow: true });
    return this.modelId;
  }

  /** After an API key change: forget the last error so a new one is shown again. */
  reset() {
    this.lastModelError = '';
    this.loadModel();
  }

  async loadModel({ quiet = false, rethrow = false } = {}) {
    try {
      const body = await fetchModels();
      const id = body?.data?.[0]?.id;
      if (!id) throw new Error('the server lists no model');
      this.modelId = id;
      this.lastModelError = '';
      showModel(id, 'ready');
      this.onModel(id);
    } catch (err) {
      const message =
        err instanceof ApiError && err.status === 401
          ? 'The server needs an API key (401): set it in Settings.'
          : `Could not get the model name: ${err.message}`;
      showModel('model unknown', 'error');
      // The same failure every 15 s would bury the page in toasts: say each one once.
      if (!quiet && message !== this.lastModelError) toast(message, { kind: 'error' });
      this.lastModelError = message;
      if (rethrow) throw err;
    }
  }
}
