// Small DOM helpers. Text always goes in through textContent / text nodes; the one place that
// assigns HTML is chat.js with markdown.js's escaped output.

/** el('div', {class: 'x', text: 'hi', onclick: fn}, child, 'text', ...) */
export function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === null || value === undefined || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on') && typeof value === 'function') {
      node.addEventListener(key.slice(2), value);
    } else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) node.append(child);
  }
  return node;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

// 24x24 stroke icons (drawn for this UI; same style as the inline ones in index.html).
const ICONS = {
  chat: 'M4 5h16v11H8l-4 4z',
  edit: 'M4 20h4L19 9l-4-4L4 16zM14 6l4 4',
  trash: 'M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13',
  download: 'M12 4v11M7 10l5 5 5-5M5 20h14',
  copy: 'M8 8h11v12H8zM5 16V4h11',
  check: 'M5 12l5 5 9-10',
  alert: 'M12 3l10 18H2zM12 10v5M12 18v.01',
  key: 'M14 10a4 4 0 1 0-3.5 4H12v2h2v2h3v-3l-3.5-3.5',
};

export function icon(name, size = 16) {
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('width', size);
  svg.setAttribute('height', size);
  svg.setAttribute('aria-hidden', 'true');
  svg.classList.add('icon');
  const path = document.createElementNS(SVG_NS, 'path');
  path.setAttribute('d', ICONS[name] || '');
  svg.append(path);
  return svg;
}

/**
 * A short-lived notice in the corner. Errors stay until dismissed, so none slips by unread.
 * action: {label, run} adds a button (e.g. Undo).
 */
export function toast(message, { kind = 'info', action = null, timeout = 6000 } = {}) {
  const host = document.getElementById('toasts');
  const close = () => node.remove();
  const node = el(
    'div',
    { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : 'status' },
    kind === 'error' ? icon('alert') : null,
    el('span', { class: 'toast-text', text: message }),
    action
      ? el('button', {
          type: 'button',
          class: 'btn ghost small',
          text: action.label,
          onclick: () => {
            close();
            action.run();
          },
        })
      : null,
    el('button', { type: 'button', class: 'btn ghost small icon-only', 'aria-label': 'Dismiss', text: '×', onclick: close }),
  );
  host.append(node);
  if (kind !== 'error' && timeout) setTimeout(close, timeout);
  return node;
}

/** Copies text, falling back to a hidden textarea where the Clipboard API is unavailable (plain http). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el('textarea', { class: 'offscreen', readonly: true });
  area.value = text;
  document.body.append(area);
  area.select();
  const ok = document.execCommand('copy');
  area.remove();
  if (!ok) throw new Error('the browser refused to copy');
}

/** Starts a download of `text` as a file, without any network request. */
export function downloadText(filename, text, type = 'application/json') {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const a = el('a', { href: url, download: filename, class: 'offscreen' });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

export function formatNumber(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return '–';
  return Number(value).toLocaleString(undefined, { minimumFractionDigits: digits, maximumFractionDigits: digits });
}
