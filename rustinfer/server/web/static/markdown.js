// Markdown and math for model answers.
//
// Safety rests on markdown-it with `html: false`: every `<`, `>` and `&` in the source comes out
// escaped, raw HTML blocks and inline tags are shown as text, and its link validator drops
// `javascript:`/`vbscript:`/`file:` URLs. KaTeX runs with `trust: false`, so `\href`, `\url`,
// `\htmlClass` and friends cannot inject links or attributes. The HTML string returned here is
// the only string the UI ever assigns to innerHTML.
//
// Math: markdown-it has no math of its own, and the plugins on npm each cover only some of the
// delimiters models write (`$..$`, `$$..$$`, `\(..\)`, `\[..\]`), so a small plugin below adds
// all four. `\(` and `\[` must be caught before markdown-it's backslash-escape rule, which would
// otherwise turn `\(` into a plain `(`.

import markdownit from './vendor/markdown-it/markdown-it.esm.min.js';
import katex from './vendor/katex/katex.mjs';

const KATEX_OPTIONS = {
  throwOnError: false, // a typo in a formula shows as red source text, not a broken answer
  trust: false,
  strict: 'ignore',
  output: 'htmlAndMathml', // MathML for screen readers, HTML for looks
  maxSize: 20, // em: stops `\rule{1000em}{1000em}` from covering the page
  maxExpand: 500, // stops macro bombs from hanging the tab
};

const md = markdownit({
  html: false,
  linkify: false, // bare URLs stay text; only explicit [links](...) become anchors
  typographer: false, // code-like text in prose should stay exactly as written
  breaks: true, // models put single newlines where they mean line breaks
});

// Images would make the browser fetch arbitrary URLs chosen by the model (no network at run
// time, and a tracking-pixel vector); `![alt](url)` is shown as text instead.
md.disable('image');

export function escapeHtml(text) {
  return md.utils.escapeHtml(text);
}

// A streaming answer is re-rendered on every frame, and KaTeX is the costly part of that:
// formulas already seen come from this cache (insertion-ordered Map, oldest dropped first).
const mathCache = new Map();
const MATH_CACHE_SIZE = 500;

function renderMath(tex, displayMode) {
  const key = `${displayMode ? 'D' : 'I'}${tex}`;
  let html = mathCache.get(key);
  if (html === undefined) {
    html = renderMathUncached(tex, displayMode);
    if (mathCache.size >= MATH_CACHE_SIZE) mathCache.delete(mathCache.keys().next().value);
    mathCache.set(key, html);
  }
  return html;
}

function renderMathUncached(tex, displayMode) {
  try {
    return katex.renderToString(tex, { ...KATEX_OPTIONS, displayMode });
  } catch (err) {
    // throwOnError=false covers parse errors; anything else (e.g. maxExpand) lands here.
    const cls = displayMode ? 'math-error math-display' : 'math-error';
    return `<code class="${cls}" title="${escapeHtml(String(err.message || err))}">${escapeHtml(tex)}</code>`;
  }
}

// ---- inline math: $..$, $$..$$ (display inside a paragraph), \(..\), \[..\] -------------------

function isWhitespace(ch) {
  return ch === ' ' || ch === '\t' || ch === '\n';
}

// Finds the closing `$` of `$..$`, with pandoc's rules so that prices ("$5 and $10") stay text:
// the opening `$` is not followed by a space, the closing one is not preceded by a space nor
// followed by a digit, and `\$` never closes.
function findDollarClose(src, start, max) {
  for (let pos = start; pos < max; pos++) {
    const ch = src[pos];
    if (ch === '\\') {
      pos++;
      continue;
    }
    if (ch !== '$') continue;
    const next = src[pos + 1];
    if (!isWhitespace(src[pos - 1]) && !(next >= '0' && next <= '9')) return pos;
  }
  return -1;
}

function mathInline(state, silent) {
  const { src, pos, posMax } = state;
  let open;
  let close;
  let display = false;

  if (src.startsWith('\\(', pos) || src.startsWith('\\[', pos)) {
    display = src[pos + 1] === '[';
    const closer = display ? '\\]' : '\\)';
    open = pos + 2;
    close = src.indexOf(closer, open);
    if (close < 0 || close + 2 > posMax) return false;
    if (!silent) pushMath(state, src.slice(open, close), display);
    state.pos = close + 2;
    return true;
  }

  if (src[pos] !== '$') return false;
  if (src[pos + 1] === '$') {
    display = true;
    open = pos + 2;
    close = src.indexOf('$$', open);
    if (close < 0 || close + 2 > posMax || close === open) return false;
    if (!silent) pushMath(state, src.slice(open, close), true);
    state.pos = close + 2;
    return true;
  }
  open = pos + 1;
  if (open >= posMax || isWhitespace(src[open])) return false;
  close = findDollarClose(src, open, posMax);
  if (close < 0) return false;
  if (!silent) pushMath(state, src.slice(open, close), false);
  state.pos = close + 1;
  return true;
}

function pushMath(state, content, display) {
  const token = state.push(display ? 'math_inline_display' : 'math_inline', 'math', 0);
  token.content = content;
  token.markup = display ? '$$' : '$';
}

// ---- block math: lines opening with $$ or \[ and running to the matching closer ------------------

function mathBlock(state, startLine, endLine, silent) {
  const lineStart = state.bMarks[startLine] + state.tShift[startLine];
  const lineEnd = state.eMarks[startLine];
  // Four spaces of indent make an indented code block; leave it to markdown-it.
  if (state.sCount[startLine] - state.blkIndent >= 4) return false;

  const first = state.src.slice(lineStart, lineEnd);
  let closer;
  if (first.startsWith('$$')) closer = '$$';
  else if (first.startsWith('\\[')) closer = '\\]';
  else return false;

  // The closer may sit on the opening line ($$ x $$) or on any later line. While an answer is
  // still streaming it may not have arrived yet: then this is no math block (shown as text).
  let content;
  let nextLine = startLine;
  const rest = first.slice(2);
  const sameLine = rest.indexOf(closer);
  if (sameLine >= 0) {
    // Text after the closer on the same line means this is inline math inside a paragraph.
    if (rest.slice(sameLine + 2).trim() !== '') return false;
    content = rest.slice(0, sameLine);
  } else {
    const lines = [rest];
    let found = false;
    for (let line = startLine + 1; line < endLine; line++) {
      const text = state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line]);
      const at = text.indexOf(closer);
      if (at >= 0) {
        if (text.slice(at + 2).trim() !== '') return false;
        lines.push(text.slice(0, at));
        nextLine = line;
        found = true;
        break;
      }
      lines.push(text);
    }
    if (!found) return false;
    content = lines.join('\n');
  }
  if (silent) return true;

  const token = state.push('math_block', 'math', 0);
  token.block = true;
  token.content = content;
  token.markup = closer;
  token.map = [startLine, nextLine + 1];
  state.line = nextLine + 1;
  return true;
}

md.inline.ruler.before('escape', 'math_inline', mathInline);
md.block.ruler.before('fence', 'math_block', mathBlock, {
  alt: ['paragraph', 'reference', 'blockquote', 'list'],
});
md.renderer.rules.math_inline = (tokens, idx) => renderMath(tokens[idx].content, false);
md.renderer.rules.math_inline_display = (tokens, idx) => renderMath(tokens[idx].content, true);
md.renderer.rules.math_block = (tokens, idx) =>
  `<div class="math-block">${renderMath(tokens[idx].content, true)}</div>\n`;

// ---- code blocks, links, tables ------------------------------------------------------------------

// Code blocks get a header with the language and a Copy button; the button is wired by event
// delegation in chat.js (no inline handlers, so a strict CSP holds). token.content is escaped
// exactly once, so the code's textContent equals what the model wrote, byte for byte.
function renderCode(content, lang) {
  const label = escapeHtml(lang || 'text');
  const cls = lang ? ` class="language-${escapeHtml(lang)}"` : '';
  return (
    `<div class="code-block"><div class="code-head"><span class="code-lang">${label}</span>` +
    `<button type="button" class="copy-code" aria-label="Copy code">Copy</button></div>` +
    `<pre><code${cls}>${escapeHtml(content)}</code></pre></div>\n`
  );
}

md.renderer.rules.fence = (tokens, idx) => {
  const token = tokens[idx];
  const info = token.info ? md.utils.unescapeAll(token.info).trim() : '';
  return renderCode(token.content, info.split(/\s+/)[0]);
};
md.renderer.rules.code_block = (tokens, idx) => renderCode(tokens[idx].content, '');

// Links open in a new tab and tell the target nothing about this page.
const defaultLinkOpen =
  md.renderer.rules.link_open || ((tokens, idx, options, env, self) => self.renderToken(tokens, idx, options));
md.renderer.rules.link_open = (tokens, idx, options, env, self) => {
  tokens[idx].attrSet('target', '_blank');
  tokens[idx].attrSet('rel', 'noopener noreferrer nofollow');
  return defaultLinkOpen(tokens, idx, options, env, self);
};

// Wide tables scroll inside their own box instead of widening the whole chat column.
md.renderer.rules.table_open = () => '<div class="table-wrap"><table>\n';
md.renderer.rules.table_close = () => '</table></div>\n';

/** Markdown (with math) to an HTML string that is safe to assign to innerHTML. */
export function renderMarkdown(source) {
  return md.render(String(source ?? ''));
}
