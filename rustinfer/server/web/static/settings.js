// The settings dialog (#settings in index.html): system prompt, sampling, max tokens, API key.

import { DEFAULT_SETTINGS, LIMITS, normaliseSettings } from './store.js';

const $ = (id) => document.getElementById(id);

export class SettingsDialog {
  /** onSave(next) receives validated settings when the person presses Save. */
  constructor({ onSave }) {
    this.onSave = onSave;
    $('settings-form').addEventListener('submit', (event) => {
      event.preventDefault();
      this.save();
    });
    $('settings-cancel').addEventListener('click', () => $('settings').close());
    // Defaults resets the sampling fields; the API key is left alone, since retyping it is a chore.
    $('settings-reset').addEventListener('click', () =>
      this.fill({ ...DEFAULT_SETTINGS, apiKey: $('set-api-key').value }),
    );
    $('set-temperature').addEventListener('input', syncOutputs);
    $('set-top-p').addEventListener('input', syncOutputs);
    $('toggle-key').addEventListener('click', () => {
      const input = $('set-api-key');
      input.type = input.type === 'password' ? 'text' : 'password';
      $('toggle-key').textContent = input.type === 'password' ? 'Show' : 'Hide';
    });
  }

  get isOpen() {
    return $('settings').open;
  }

  open(settings) {
    this.fill(settings);
    $('settings-error').hidden = true;
    $('set-api-key').type = 'password';
    $('toggle-key').textContent = 'Show';
    $('settings').showModal();
  }

  fill(s) {
    $('set-system').value = s.systemPrompt;
    $('set-temperature').value = s.temperature;
    $('set-top-p').value = s.topP;
    $('set-max-tokens').value = s.maxTokens;
    $('set-api-key').value = s.apiKey;
    syncOutputs();
  }

  save() {
    const maxTokens = Number($('set-max-tokens').value);
    const [lo, hi] = LIMITS.maxTokens;
    if (!Number.isInteger(maxTokens) || maxTokens < lo || maxTokens > hi) {
      const error = $('settings-error');
      error.textContent = `Max tokens must be a whole number from ${lo} to ${hi}.`;
      error.hidden = false;
      $('set-max-tokens').focus();
      return;
    }
    const next = normaliseSettings({
      systemPrompt: $('set-system').value,
      temperature: $('set-temperature').value,
      topP: $('set-top-p').value,
      maxTokens,
      apiKey: $('set-api-key').value.trim(),
    });
    $('settings').close();
    this.onSave(next);
  }
}

function syncOutputs() {
  $('out-temperature').textContent = Number($('set-temperature').value).toFixed(2);
  $('out-top-p').textContent = Number($('set-top-p').value).toFixed(2);
}
