// What the UI keeps in the browser (localStorage): the settings and the conversations.
//
// Conversation: {id, title, titleEdited, createdAt, updatedAt, messages: [Message]}
// Message:      {role: 'user'|'assistant', content, stats?, error?, stopped?, finishReason?}
// The keys carry a version so a later change of shape can migrate instead of misreading.

const SETTINGS_KEY = 'rustinfer.settings.v1';
const CONVERSATIONS_KEY = 'rustinfer.conversations.v1';
const ACTIVE_KEY = 'rustinfer.active.v1';

export const DEFAULT_SETTINGS = Object.freeze({
  systemPrompt: '',
  temperature: 0.7,
  topP: 0.95,
  maxTokens: 512,
  apiKey: '',
});

// Bounds the settings form enforces too; a value outside is clamped rather than sent, so a bad
// hand-edit of localStorage cannot make every request fail.
export const LIMITS = Object.freeze({
  temperature: [0, 2],
  topP: [0.01, 1],
  maxTokens: [1, 32768],
});

/** Problems with storage are reported here (the app shows them) rather than swallowed. */
let reportProblem = (message) => console.error(message);
export function onStorageProblem(fn) {
  reportProblem = fn;
}

function read(key, fallback) {
  let raw;
  try {
    raw = localStorage.getItem(key);
  } catch (err) {
    reportProblem(`Browser storage is not available, so nothing will be kept after a reload (${err.message}).`);
    return fallback;
  }
  if (raw === null) return fallback;
  try {
    return JSON.parse(raw);
  } catch {
    // Keep the unreadable text under another key instead of overwriting it on the next save.
    try {
      localStorage.setItem(`${key}.corrupt`, raw);
    } catch {
      // Storage is full or gone; the report below still tells the person.
    }
    reportProblem(`Stored data under "${key}" could not be read; it was set aside as "${key}.corrupt".`);
    return fallback;
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
    return true;
  } catch (err) {
    const full = err.name === 'QuotaExceededError';
    reportProblem(
      full
        ? 'Browser storage is full: this change was not saved. Delete or export old conversations.'
        : `Could not save to browser storage (${err.message}).`,
    );
    return false;
  }
}

function clamp(value, [lo, hi], fallback) {
  const n = Number(value);
  if (!Number.isFinite(n)) return fallback;
  return Math.min(hi, Math.max(lo, n));
}

export function normaliseSettings(raw) {
  const s = { ...DEFAULT_SETTINGS, ...(raw && typeof raw === 'object' ? raw : {}) };
  return {
    systemPrompt: String(s.systemPrompt ?? ''),
    temperature: clamp(s.temperature, LIMITS.temperature, DEFAULT_SETTINGS.temperature),
    topP: clamp(s.topP, LIMITS.topP, DEFAULT_SETTINGS.topP),
    maxTokens: Math.round(clamp(s.maxTokens, LIMITS.maxTokens, DEFAULT_SETTINGS.maxTokens)),
    apiKey: String(s.apiKey ?? ''),
  };
}

export function loadSettings() {
  return normaliseSettings(read(SETTINGS_KEY, null));
}

export function saveSettings(settings) {
  return write(SETTINGS_KEY, normaliseSettings(settings));
}

// crypto.randomUUID exists only in secure contexts (https, localhost); a server reached over
// plain http on a LAN address is not one, while getRandomValues works everywhere.
export function newId() {
  const bytes = crypto.getRandomValues(new Uint8Array(12));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

export function titleFrom(text) {
  const line = String(text).trim().split('\n')[0].replace(/\s+/g, ' ');
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || 'New chat';
}

function isConversation(c) {
  return c && typeof c === 'object' && typeof c.id === 'string' && Array.isArray(c.messages);
}

export class ConversationStore {
  constructor() {
    this.reload();
  }

  /** Re-reads storage (on start, and when another tab changed it). */
  reload() {
    const raw = read(CONVERSATIONS_KEY, []);
    this.conversations = Array.isArray(raw) ? raw.filter(isConversation) : [];
    for (const c of this.conversations) {
      c.title = typeof c.title === 'string' && c.title ? c.title : 'Untitled';
      c.updatedAt = Number(c.updatedAt) || 0;
      c.createdAt = Number(c.createdAt) || c.updatedAt;
    }
  }

  /** Newest first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) || null;
  }

  /** A draft: it joins the stored list when its first message is saved. */
  create() {
    const now = Date.now();
    return { id: newId(), title: 'New chat', titleEdited: false, createdAt: now, updatedAt: now, messages: [] };
  }

  save(conv, { touch = true } = {}) {
    if (touch) conv.updatedAt = Date.now();
    if (!this.get(conv.id)) this.conversations.push(conv);
    return this.persist();
  }

  rename(conv, title) {
    conv.title = title.trim() || conv.title;
    conv.titleEdited = true;
    return this.save(conv, { touch: false });
  }

  remove(id) {
    const conv = this.get(id);
    this.conversations = this.conversations.filter((c) => c.id !== id);
    this.persist();
    return conv;
  }

  persist() {
    // An answer saved while it still streams is marked interrupted: if the page goes away
    // before the final save, a reload shows it as cut short rather than as complete.
    const clean = this.conversations.map((c) => ({
      ...c,
      messages: c.messages.map(({ pending, startedAt, ...m }) => (pending ? { ...m, interrupted: true } : m)),
    }));
    return write(CONVERSATIONS_KEY, clean);
  }

  static get storageKey() {
    return CONVERSATIONS_KEY;
  }
}

export function loadActiveId() {
  try {
    return localStorage.getItem(ACTIVE_KEY);
  } catch {
    return null;
  }
}

export function saveActiveId(id) {
  try {
    localStorage.setItem(ACTIVE_KEY, id);
  } catch {
    // Not worth a message: losing which chat was open costs one click after a reload.
  }
}

/** A conversation (or all of them) as a JSON file the person can keep or re-import elsewhere. */
export function exportJson(conversations) {
  const clean = conversations.map((c) => ({
    id: c.id,
    title: c.title,
    createdAt: new Date(c.createdAt).toISOString(),
    updatedAt: new Date(c.updatedAt).toISOString(),
    messages: c.messages.map(({ pending, startedAt, ...m }) => m),
  }));
  const doc = {
    format: 'rustinfer.conversations',
    version: 1,
    exportedAt: new Date().toISOString(),
    conversations: clean,
  };
  return JSON.stringify(doc, null, 2);
}
