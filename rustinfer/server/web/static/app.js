// The chat page: wires the conversation list, the composer and its stream, the settings
// dialog, the server-readiness banner and the live panel together.

import { ApiError, NetworkError, StreamError, setApiKey, streamChat } from './api.js';
import {
  ConversationStore,
  exportJson,
  loadActiveId,
  loadSettings,
  onStorageProblem,
  saveActiveId,
  saveSettings,
  titleFrom,
} from './store.js';
import { renderConversation, updateMessage, scrollToBottom, wireCodeCopy } from './chat.js';
import { LivePanel } from './metrics.js';
import { ServerStatus } from './server.js';
import { SettingsDialog } from './settings.js';
import { el, downloadText, toast } from './dom.js';

const PARTIAL_SAVE_MS = 2000; // a reload mid-answer keeps all but the last moments of it
const RENDER_INTERVAL_MS = 80; // ~12 redraws a second still reads as a smooth stream
const IDLE_HINT = 'Enter to send · Shift+Enter for a new line';
const PHONE = window.matchMedia('(max-width: 800px)');

const $ = (id) => document.getElementById(id);

const state = {
  settings: loadSettings(),
  store: null,
  conv: null, // the conversation on screen (maybe a draft not yet in the store)
  stream: null, // {controller, conv, index, deleted} while an answer streams
};

const server = new ServerStatus({ onModel: () => state.conv && renderSidebar() });
const live = new LivePanel({
  onFailure: (err) => {
    // A failed metrics fetch is often the first sign the server went away.
    if (err instanceof NetworkError) server.poll();
  },
});
const settingsDialog = new SettingsDialog({ onSave: applySettings });

const renderCtx = () => ({ modelName: server.modelId, onOpenSettings: openSettings, onRetry: retryLast });

// ---- conversations ----------------------------------------------------------------------------

function renderSidebar() {
  const items = state.store.list().map((conv) => {
    const active = conv.id === state.conv?.id;
    const streaming = state.stream?.conv.id === conv.id;
    return el(
      'button',
      {
        type: 'button',
        class: `conv-item${active ? ' active' : ''}${streaming ? ' streaming' : ''}`,
        'aria-current': active ? 'page' : null,
        title: conv.title,
        dataset: { id: conv.id },
        onclick: () => switchTo(conv),
      },
      el('span', { class: 'conv-title', text: conv.title }),
      el('span', { class: 'conv-date', text: relativeTime(conv.updatedAt) }),
    );
  });
  if (!items.length) items.push(el('p', { class: 'conv-empty', text: 'No conversations yet.' }));
  $('conv-list').replaceChildren(...items);
}

function relativeTime(ms) {
  const diff = (Date.now() - ms) / 1000;
  if (diff < 60) return 'just now';
  if (diff < 3600) return `${Math.floor(diff / 60)} min ago`;
  if (diff < 86400) return `${Math.floor(diff / 3600)} h ago`;
  return new Date(ms).toLocaleDateString();
}

function showConversation() {
  const conv = state.conv;
  $('conv-title').textContent = conv.title;
  document.title = `${conv.title} · rustinfer`;
  const stored = Boolean(state.store.get(conv.id));
  for (const id of ['rename-chat', 'export-chat', 'delete-chat']) $(id).disabled = !stored;
  renderConversation(conv, renderCtx());
  renderSidebar();
}

function switchTo(conv) {
  cancelRename();
  state.conv = conv;
  saveActiveId(conv.id);
  showConversation();
  if (PHONE.matches) setSidebar(false);
  $('prompt').focus();
}

function newChat() {
  if (state.conv && state.conv.messages.length === 0) {
    // Already on an empty chat: a second one would only clutter the list.
    if (PHONE.matches) setSidebar(false);
    $('prompt').focus();
    return;
  }
  switchTo(state.store.create());
}

function startRename() {
  if (!state.store.get(state.conv.id)) return;
  const input = $('title-input');
  input.value = state.conv.title;
  $('conv-title').hidden = true;
  input.hidden = false;
  input.focus();
  input.select();
}

function finishRename(commit) {
  const input = $('title-input');
  if (input.hidden) return;
  input.hidden = true;
  $('conv-title').hidden = false;
  if (commit && input.value.trim() && input.value.trim() !== state.conv.title) {
    state.store.rename(state.conv, input.value);
    showConversation();
  }
}

const cancelRename = () => finishRename(false);

function deleteConversation() {
  const conv = state.conv;
  if (!state.store.get(conv.id)) return;
  if (state.stream?.conv.id === conv.id) {
    state.stream.deleted = true;
    state.stream.controller.abort();
  }
  state.store.remove(conv.id);
  const next = state.store.list()[0] || state.store.create();
  switchTo(next);
  toast(`Deleted “${conv.title}”.`, {
    action: {
      label: 'Undo',
      run: () => {
        state.store.save(conv, { touch: false });
        switchTo(conv);
      },
    },
    timeout: 8000,
  });
}

function fileSlug(title) {
  return (
    title
      .toLowerCase()
      .replace(/[^a-z0-9]+/g, '-')
      .replace(/^-|-$/g, '')
      .slice(0, 40) || 'conversation'
  );
}

function exportConversation() {
  downloadText(`rustinfer-${fileSlug(state.conv.title)}.json`, exportJson([state.conv]));
}

function exportAll() {
  const all = state.store.list();
  if (!all.length) {
    toast('There are no conversations to export yet.');
    return;
  }
  downloadText(`rustinfer-conversations-${new Date().toISOString().slice(0, 10)}.json`, exportJson(all));
}

// ---- sending and streaming --------------------------------------------------------------------

/** The request's messages: the system prompt, then the turns before the new answer. */
function buildMessages(conv, answerIndex) {
  const messages = [];
  const system = state.settings.systemPrompt.trim();
  if (system) messages.push({ role: 'system', content: system });
  for (const m of conv.messages.slice(0, answerIndex)) {
    // An answer that failed before its first token has nothing to contribute to the context.
    if (m.role === 'assistant' && !m.content) continue;
    messages.push({ role: m.role, content: m.content });
  }
  return messages;
}

function describeError(err) {
  if (err instanceof ApiError) {
    if (err.status === 401) {
      return `The server refused the request (401 Unauthorized: ${err.message}). Set a valid API key in Settings.`;
    }
    return `The server answered ${err.status}: ${err.message}`;
  }
  if (err instanceof StreamError) return `Generation failed: ${err.message}`;
  if (err instanceof NetworkError) return err.message;
  console.error(err);
  return `Something went wrong in the page: ${err.message || err}`;
}

let renderPending = false;
let lastRender = 0;
function scheduleRender(conv, index) {
  // Markdown is re-rendered at most RENDER_INTERVAL_MS apart, on an animation frame, however
  // fast tokens arrive: each render costs the browser a layout and a paint, and when it shares
  // a small CPU box with the model, a render per token measurably slows the model down.
  if (renderPending) return;
  renderPending = true;
  const wait = Math.max(0, lastRender + RENDER_INTERVAL_MS - performance.now());
  setTimeout(
    () =>
      requestAnimationFrame(() => {
        renderPending = false;
        lastRender = performance.now();
        if (state.conv === conv) updateMessage(conv, index, renderCtx());
      }),
    wait,
  );
}

async function send(text) {
  if (state.stream || !text.trim()) return;
  const conv = state.conv;
  if (!conv.titleEdited && conv.messages.length === 0) conv.title = titleFrom(text);
  conv.messages.push({ role: 'user', content: text });
  const answer = { role: 'assistant', content: '', pending: true, model: server.modelId, stats: {} };
  conv.messages.push(answer);
  const index = conv.messages.length - 1;
  state.store.save(conv);
  saveActiveId(conv.id);

  const controller = new AbortController();
  const startedAt = performance.now();
  answer.startedAt = startedAt;
  const stream = { controller, conv, index, deleted: false };
  state.stream = stream;
  setStreaming(true);
  showConversation();

  try {
    const model = await server.ensureModel();
    answer.model = model;
    const body = {
      model,
      messages: buildMessages(conv, index),
      temperature: state.settings.temperature,
      top_p: state.settings.topP,
      max_tokens: state.settings.maxTokens,
    };
    let lastSave = performance.now();
    for await (const chunk of streamChat(body, controller.signal)) {
      if (chunk.usage) answer.stats = { ...answer.stats, ...chunk.usage };
      for (const choice of chunk.choices || []) {
        const piece = choice.delta?.content;
        if (piece) {
          if (answer.stats.clientTtftMs == null) answer.stats.clientTtftMs = performance.now() - startedAt;
          answer.content += piece;
        }
        if (choice.finish_reason) answer.finishReason = choice.finish_reason;
      }
      scheduleRender(conv, index);
      if (performance.now() - lastSave > PARTIAL_SAVE_MS) {
        state.store.save(conv, { touch: false });
        lastSave = performance.now();
      }
    }
  } catch (err) {
    if (err.name === 'AbortError') {
      answer.stopped = true;
    } else {
      answer.error = describeError(err);
      answer.errorStatus = err.status ?? null;
      if (err instanceof NetworkError) server.poll();
    }
  } finally {
    delete answer.pending;
    delete answer.startedAt;
    state.stream = null;
    setStreaming(false);
    if (!stream.deleted) state.store.save(conv); // saving would bring a deleted chat back
    if (state.conv === conv) updateMessage(conv, index, renderCtx());
    renderSidebar();
    live.refresh(); // the engine's counters just moved; show it without waiting 2 s
  }
}

/** Drops the failed last answer and its question, and asks the question again. */
function retryLast() {
  const conv = state.conv;
  const n = conv.messages.length;
  if (state.stream || n < 2 || conv.messages[n - 2].role !== 'user') return;
  const [question] = conv.messages.splice(n - 2, 2);
  send(question.content);
}

function setStreaming(on) {
  $('send').hidden = on;
  $('stop').hidden = !on;
  $('hint').textContent = on ? 'Generating… press Stop or Esc to end it.' : IDLE_HINT;
}

function stop() {
  state.stream?.controller.abort();
}

function autosize() {
  const box = $('prompt');
  box.style.height = 'auto';
  box.style.height = `${Math.min(box.scrollHeight, 220)}px`;
}

function submitPrompt() {
  const box = $('prompt');
  if (state.stream) return; // Enter during an answer keeps the draft; Stop ends the answer
  const text = box.value;
  if (!text.trim()) return;
  box.value = '';
  autosize();
  send(text);
}

// ---- settings ---------------------------------------------------------------------------------

function openSettings() {
  settingsDialog.open(state.settings);
}

function applySettings(next) {
  const keyChanged = next.apiKey !== state.settings.apiKey;
  state.settings = next;
  saveSettings(next);
  setApiKey(next.apiKey);
  if (keyChanged) {
    server.reset();
    live.refresh();
  }
}

// ---- layout -----------------------------------------------------------------------------------

function setSidebar(open) {
  const app = $('app');
  if (PHONE.matches) {
    app.classList.toggle('sidebar-open', open);
    $('backdrop').hidden = !open;
  } else {
    app.classList.toggle('sidebar-collapsed', !open);
  }
}

function sidebarIsOpen() {
  const app = $('app');
  return PHONE.matches ? app.classList.contains('sidebar-open') : !app.classList.contains('sidebar-collapsed');
}

// ---- start ------------------------------------------------------------------------------------

function wire() {
  $('composer').addEventListener('submit', (event) => {
    event.preventDefault();
    submitPrompt();
  });
  $('prompt').addEventListener('keydown', (event) => {
    // Enter sends, Shift+Enter breaks the line; an IME composing text keeps its Enter.
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submitPrompt();
    }
  });
  $('prompt').addEventListener('input', autosize);
  $('stop').addEventListener('click', stop);
  document.addEventListener('keydown', (event) => {
    // Esc stops an answer, except where Esc already means "cancel" (dialog, title editing).
    if (event.key !== 'Escape' || !state.stream || settingsDialog.isOpen) return;
    if (event.target.id !== 'title-input') stop();
  });

  $('new-chat').addEventListener('click', newChat);
  $('export-all').addEventListener('click', exportAll);
  $('rename-chat').addEventListener('click', startRename);
  $('conv-title').addEventListener('dblclick', startRename);
  $('title-input').addEventListener('keydown', (event) => {
    if (event.key === 'Enter') finishRename(true);
    if (event.key === 'Escape') finishRename(false);
  });
  $('title-input').addEventListener('blur', () => finishRename(true));
  $('export-chat').addEventListener('click', exportConversation);
  $('delete-chat').addEventListener('click', deleteConversation);

  $('open-sidebar').addEventListener('click', () => setSidebar(!sidebarIsOpen()));
  $('close-sidebar').addEventListener('click', () => setSidebar(false));
  $('backdrop').addEventListener('click', () => setSidebar(false));
  PHONE.addEventListener('change', () => {
    $('app').classList.remove('sidebar-open', 'sidebar-collapsed');
    $('backdrop').hidden = true;
  });

  $('open-settings').addEventListener('click', openSettings);
  // Closing or reloading mid-answer: keep what has streamed so far (marked interrupted).
  window.addEventListener('pagehide', () => {
    if (state.stream) state.store.save(state.stream.conv, { touch: false });
  });
  wireCodeCopy();

  // Another tab changed the conversations: follow it, unless this tab is mid-answer (its own
  // save at the end would win anyway, and re-reading now would orphan the streaming object).
  window.addEventListener('storage', (event) => {
    if (event.key !== ConversationStore.storageKey || state.stream) return;
    state.store.reload();
    state.conv = state.store.get(state.conv.id) || state.conv;
    showConversation();
  });
}

function start() {
  onStorageProblem((message) => toast(message, { kind: 'error' }));
  state.store = new ConversationStore();
  setApiKey(state.settings.apiKey);
  const active = state.store.get(loadActiveId());
  state.conv = active || state.store.list()[0] || state.store.create();
  wire();
  setStreaming(false);
  showConversation();
  scrollToBottom(true);
  server.poll();
  live.start();
  $('prompt').focus();
}

start();
