// The server's HTTP API as the UI uses it: JSON GETs, the readiness probe, and the streamed
// chat completion (OpenAI's server-sent events). Every /v1 call carries the API key, if one is
// set, as `Authorization: Bearer KEY`.

/** A non-2xx answer, carrying the OpenAI error body's fields. */
export class ApiError extends Error {
  constructor(status, message, { type = null, code = null, param = null } = {}) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
  }
}

/** The request never got an HTTP answer (server down, connection refused or reset). */
export class NetworkError extends Error {
  constructor(message) {
    super(message);
    this.name = 'NetworkError';
  }
}

/** An error event inside an already started stream: `data: {"error": {...}}`. */
export class StreamError extends Error {
  constructor(error) {
    super(error?.message || 'The server reported an error while generating.');
    this.name = 'StreamError';
    this.type = error?.type ?? null;
    this.code = error?.code ?? null;
  }
}

let apiKey = '';

export function setApiKey(key) {
  apiKey = (key || '').trim();
}

function withAuth(headers = {}) {
  return apiKey ? { ...headers, Authorization: `Bearer ${apiKey}` } : { ...headers };
}

// The server's errors are `{"error": {"message", "type", "param", "code"}}`; a proxy in front of
// it may answer with HTML or plain text instead, and FastAPI's own 404/405 with `{"detail"}`.
async function errorFromResponse(resp) {
  let message = `HTTP ${resp.status} ${resp.statusText || ''}`.trim();
  let fields = {};
  let text = '';
  try {
    text = await resp.text();
  } catch {
    // The body could not be read; the status line is all there is.
  }
  if (text) {
    try {
      const body = JSON.parse(text);
      if (body && typeof body.error === 'object' && body.error) {
        message = body.error.message || message;
        fields = body.error;
      } else if (body && body.detail) {
        message = typeof body.detail === 'string' ? body.detail : JSON.stringify(body.detail);
      } else {
        message = `${message}: ${text.slice(0, 300)}`;
      }
    } catch {
      message = `${message}: ${text.slice(0, 300)}`;
    }
  }
  return new ApiError(resp.status, message, fields);
}

async function request(path, init = {}) {
  let resp;
  try {
    resp = await fetch(path, { cache: 'no-store', ...init, headers: withAuth(init.headers) });
  } catch (err) {
    if (err.name === 'AbortError') throw err;
    throw new NetworkError(`Cannot reach the server (${err.message}).`);
  }
  if (!resp.ok) throw await errorFromResponse(resp);
  return resp;
}

async function getJson(path, signal) {
  const resp = await request(path, { signal });
  return resp.json();
}

export const fetchModels = (signal) => getJson('/v1/models', signal);
export const fetchMetrics = (signal) => getJson('/v1/metrics', signal);

/**
 * Asks GET /ready (not under /v1, so no key). Never throws:
 * {state: 'ready'} | {state: 'loading' | 'error', message, code} | {state: 'down', message}.
 */
export async function checkReady() {
  let resp;
  try {
    resp = await fetch('/ready', { cache: 'no-store' });
  } catch (err) {
    return { state: 'down', message: err.message };
  }
  if (resp.ok) return { state: 'ready' };
  const err = await errorFromResponse(resp);
  // 503 is "not yet" only while the model loads; a failed load or a shutdown is also a 503
  // but will not fix itself, and its message says so.
  const loading = resp.status === 503 && (err.code === 'model_loading' || err.code === null);
  return { state: loading ? 'loading' : 'error', message: err.message, code: err.code };
}

// One SSE event block ("data: ...\n" lines, blank-line terminated) to its data payload.
// Comment lines (":" keep-alives) and other fields (event:, id:, retry:) carry nothing for us.
function eventData(block) {
  const data = [];
  for (const line of block.split('\n')) {
    if (line.startsWith('data:')) data.push(line.slice(line[5] === ' ' ? 6 : 5));
  }
  return data.length ? data.join('\n') : null;
}

/**
 * POST /v1/chat/completions with stream: true, yielding each parsed chunk object.
 * Throws ApiError (non-2xx, before the stream), NetworkError, StreamError (an error event in
 * the stream), or AbortError when `signal` aborts. Returns normally after `data: [DONE]`;
 * a stream that ends without [DONE] throws, since the answer may be cut short.
 */
export async function* streamChat(body, signal) {
  const resp = await request('/v1/chat/completions', {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  let finished = false;
  try {
    for (;;) {
      let chunk;
      try {
        chunk = await reader.read();
      } catch (err) {
        if (err.name === 'AbortError') throw err;
        throw new NetworkError(`The connection broke mid-answer (${err.message}).`);
      }
      if (chunk.done) break;
      // Normalise CRLF over the whole buffer so a pair split across two reads still joins.
      buffer = (buffer + chunk.value).replace(/\r\n/g, '\n');
      let end;
      while ((end = buffer.indexOf('\n\n')) >= 0) {
        const data = eventData(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (data === null) continue;
        if (data === '[DONE]') {
          finished = true;
          return;
        }
        let parsed;
        try {
          parsed = JSON.parse(data);
        } catch {
          throw new StreamError({ message: `Unreadable event from the server: ${data.slice(0, 200)}` });
        }
        if (parsed && parsed.error) throw new StreamError(parsed.error);
        yield parsed;
      }
    }
    throw new NetworkError('The server closed the stream before the answer was complete.');
  } finally {
    // On an early exit (error, abort, consumer break) close the connection, so the server
    // notices the drop and frees the request in the engine.
    if (!finished) reader.cancel().catch(() => {});
  }
}
