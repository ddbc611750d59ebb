// Drawing the messages of one conversation, and keeping a streaming answer's node up to date.

import { renderMarkdown } from './markdown.js';
import { el, icon, formatNumber, copyText, toast } from './dom.js';

const list = () => document.getElementById('messages');

/** Footer chips of one answer: from the usage chunk, else what the browser measured itself. */
function statsChips(msg) {
  const chips = [];
  const chip = (label, value, title) =>
    chips.push(el('span', { class: 'chip', title }, el('span', { class: 'chip-label', text: label }), ` ${value}`));
  const s = msg.stats || {};
  const perf = s.performance || {};
  const ttft = perf.time_to_first_token_ms ?? s.clientTtftMs;
  if (ttft != null) {
    const source = perf.time_to_first_token_ms != null ? 'measured by the server' : 'measured in the browser';
    chip('TTFT', `${formatNumber(ttft, 0)} ms`, `Time to first token, ${source}`);
  }
  if (perf.prefill_ms != null) chip('prefill', `${formatNumber(perf.prefill_ms, 0)} ms`, 'Prompt processing time');
  if (perf.tokens_per_second != null) {
    const detail =
      perf.decode_ms != null ? `${formatNumber(perf.decode_ms, 0)} ms over ${perf.decode_iterations ?? '?'} steps` : '';
    chip('decode', `${formatNumber(perf.tokens_per_second, 1)} tok/s`, `Decode speed ${detail}`.trim());
  }
  if (s.prompt_tokens != null) {
    const cached = s.prompt_tokens_details?.cached_tokens;
    const suffix = cached ? ` (${cached} cached)` : '';
    chip('prompt', `${s.prompt_tokens}${suffix}`, 'Prompt tokens (served from the prefix cache)');
  }
  if (s.completion_tokens != null) chip('completion', s.completion_tokens, 'Completion tokens');
  if (msg.stopped) chips.push(el('span', { class: 'chip warn', text: 'stopped' }));
  else if (msg.interrupted) {
    chips.push(el('span', { class: 'chip warn', title: 'The page was closed or reloaded mid-answer', text: 'interrupted' }));
  }
  else if (msg.finishReason === 'length') {
    chips.push(el('span', { class: 'chip warn', title: 'Hit max tokens (see Settings)', text: 'max tokens reached' }));
  }
  return chips;
}

function errorBox(msg, isLast, { onOpenSettings, onRetry }) {
  const box = el('div', { class: 'msg-error', role: 'alert' }, icon('alert'), el('span', { text: msg.error }));
  if (msg.errorStatus === 401) {
    box.append(el('button', { type: 'button', class: 'btn small', text: 'Open settings', onclick: onOpenSettings }));
  }
  // Only the last answer can be retried: an earlier one has later turns built on it.
  if (isLast && onRetry) box.append(el('button', { type: 'button', class: 'btn small', text: 'Retry', onclick: onRetry }));
  return box;
}

/** The "processing prompt" line shown from send until the first token. */
function pendingIndicator(startedAt) {
  const elapsed = el('span', { class: 'elapsed' });
  const node = el(
    'div',
    { class: 'processing', role: 'status' },
    el('span', { class: 'dots' }, el('i'), el('i'), el('i')),
    el('span', { text: 'Processing prompt' }),
    elapsed,
  );
  const tick = () => {
    if (!node.isConnected) return;
    elapsed.textContent = `${((performance.now() - startedAt) / 1000).toFixed(1)} s`;
    setTimeout(tick, 100);
  };
  requestAnimationFrame(tick);
  return node;
}

/**
 * Sets `target`'s content to `html` (markdown.js output, escaped there: see its header),
 * touching only the top-level blocks that changed. While an answer streams only its last
 * paragraph changes; leaving the others in place spares the browser re-laying-out and
 * re-painting the whole answer on every token, which on a small CPU box competes with the
 * model for the same cores.
 */
function patchHtml(target, html) {
  const template = document.createElement('template');
  template.innerHTML = html;
  const next = [...template.content.childNodes];
  for (let i = 0; i < next.length; i++) {
    const old = target.childNodes[i];
    if (!old) target.append(next[i]);
    else if (!old.isEqualNode(next[i])) old.replaceWith(next[i]);
  }
  while (target.childNodes.length > next.length) target.lastChild.remove();
}

function renderAssistantInto(node, msg, isLast, ctx) {
  const body = node.querySelector('.msg-body');
  patchHtml(body, msg.content ? renderMarkdown(msg.content) : '');
  const waiting = msg.pending && !msg.content;
  node.classList.toggle('streaming', Boolean(msg.pending && msg.content));
  // Screen readers wait for the finished answer instead of reading every partial one.
  node.setAttribute('aria-busy', msg.pending ? 'true' : 'false');
  const status = node.querySelector('.msg-status');
  const foot = node.querySelector('.msg-foot');
  if (msg.pending) {
    // Mid-stream only the indicator can change: leave the rest of the DOM alone.
    if (waiting && !status.querySelector('.processing')) {
      status.replaceChildren(pendingIndicator(msg.startedAt ?? performance.now()));
    } else if (!waiting && status.firstChild) {
      status.replaceChildren();
    }
    return;
  }
  status.replaceChildren();
  if (msg.error) status.append(errorBox(msg, isLast, ctx));
  foot.replaceChildren(...statsChips(msg));
  if (msg.content) {
    foot.append(
      el('button', {
        type: 'button',
        class: 'btn ghost small copy-answer',
        title: 'Copy answer as Markdown',
        'aria-label': 'Copy answer',
        onclick: () => copyWithFeedback(msg.content, null),
      }, icon('copy', 14)),
    );
  }
}

function messageNode(msg, index, ctx) {
  if (msg.role === 'user') {
    // The person's own text is shown exactly as typed (pre-wrap), never parsed as HTML.
    return el('article', { class: 'msg user', dataset: { index } }, el('div', { class: 'msg-body', text: msg.content }));
  }
  const node = el(
    'article',
    { class: 'msg assistant', dataset: { index } },
    el('div', { class: 'msg-who', text: msg.model || ctx.modelName || 'assistant' }),
    el('div', { class: 'msg-body markdown' }),
    el('div', { class: 'msg-status' }),
    el('footer', { class: 'msg-foot' }),
  );
  renderAssistantInto(node, msg, index === ctx.lastIndex, ctx);
  return node;
}

/** Replaces the message list with `conv`'s messages. ctx: {modelName, onOpenSettings, onRetry}. */
export function renderConversation(conv, ctx) {
  const host = list();
  const lastIndex = conv.messages.length - 1;
  const nodes = conv.messages.map((m, i) => messageNode(m, i, { ...ctx, lastIndex }));
  host.replaceChildren(...nodes);
  document.getElementById('empty').hidden = conv.messages.length > 0;
  scrollToBottom(true);
}

/** Re-draws message `index` in place (a streaming answer; called at most once per frame). */
export function updateMessage(conv, index, ctx) {
  const host = list();
  const node = host.querySelector(`.msg[data-index="${index}"]`);
  const msg = conv.messages[index];
  if (!node || !msg) return;
  const stick = isNearBottom();
  if (msg.role === 'assistant') renderAssistantInto(node, msg, index === conv.messages.length - 1, ctx);
  if (stick) scrollToBottom(true);
}

function isNearBottom() {
  const host = list();
  return host.scrollHeight - host.scrollTop - host.clientHeight < 80;
}

// Follows a streaming answer only while the person is at the bottom: scrolling up to read
// something earlier must not be yanked back down on every token.
export function scrollToBottom(force = false) {
  const host = list();
  if (force || isNearBottom()) host.scrollTop = host.scrollHeight;
}

async function copyWithFeedback(text, button) {
  try {
    await copyText(text);
    if (button) {
      button.textContent = 'Copied';
      setTimeout(() => {
        button.textContent = 'Copy';
      }, 1500);
    } else {
      toast('Copied to the clipboard.');
    }
  } catch (err) {
    toast(`Could not copy: ${err.message}`, { kind: 'error' });
  }
}

/** Copy buttons inside rendered Markdown are wired once here, by delegation. */
export function wireCodeCopy() {
  list().addEventListener('click', (event) => {
    const button = event.target.closest('.copy-code');
    if (!button) return;
    const code = button.closest('.code-block')?.querySelector('pre code');
    if (code) copyWithFeedback(code.textContent, button);
  });
}
