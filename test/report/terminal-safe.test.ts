import { describe, expect, it } from 'vitest';
import { formatStatus } from '../../src/report/status.js';
import { terminalSafe } from '../../src/report/terminal-safe.js';

/** Characters a terminal would act on rather than print, found in `text`. */
function rawControls(text: string): string[] {
  return Array.from(text).filter((c) => {
    const code = c.codePointAt(0) ?? 0;
    return (
      code < 0x20 ||
      (code >= 0x7f && code <= 0x9f) ||
      [0x061c, 0x200e, 0x200f, 0x2028, 0x2029].includes(code) ||
      (code >= 0x202a && code <= 0x202e) ||
      (code >= 0x2066 && code <= 0x2069)
    );
  });
}

describe('terminalSafe', () => {
  it('shows escape sequences, C0/C1 controls and bidi overrides as escapes', () => {
    expect(terminalSafe('\x1b]0;pwned\x07')).toBe('\\x1b]0;pwned\\x07');
    expect(terminalSafe('\x1b[31mred\x1b[0m')).toBe('\\x1b[31mred\\x1b[0m');
    expect(terminalSafe('\x1b]8;;https://evil.example\x1b\\click\x1b]8;;\x1b\\')).toBe(
      '\\x1b]8;;https://evil.example\\x1b\\click\\x1b]8;;\\x1b\\',
    );
    expect(terminalSafe('invoice\u202eexe.txt')).toBe('invoice\\u202eexe.txt');
    expect(terminalSafe('a\nb\tc\rd\0e\x7f\x9b\u2066\u2069\u2028')).toBe(
      'a\\x0ab\\x09c\\x0dd\\x00e\\x7f\\x9b\\u2066\\u2069\\u2028',
    );
  });

  it('leaves ordinary text alone, non-ASCII and backslashes included', () => {
    const text = 'Grüße, 東京 🙂 C:\\temp "quoted" \u00a0nbsp';
    expect(terminalSafe(text)).toBe(text);
  });

  it('is applied by status to every string from the database', () => {
    const hostile = 'x\x1b]0;pwned\x07\x1b[2J\u202e';
    const text = formatStatus({
      coverage: [
        {
          provider: hostile,
          model: hostile,
          eligible: 1,
          upToDate: 1,
          stale: 0,
          missing: 0,
          orphans: 0,
        },
      ],
      queue: [
        {
          provider: hostile,
          model: hostile,
          pending: 2,
          claimed: 1,
          backingOff: 1,
          lagSeconds: 3,
          lastError: hostile,
          backfilled: true,
        },
      ],
      budgets: [
        {
          provider: hostile,
          model: hostile,
          runId: '1',
          perDay: false,
          budgetTokens: 10,
          spentTokens: 4,
        },
      ],
      runs: [
        {
          runId: '1',
          provider: hostile,
          model: hostile,
          status: hostile,
          planned: 1,
          embedded: 0,
          skipped: 1,
          percent: 100,
          messagesPerSecond: null,
          etaSeconds: null,
          heartbeatAgeSeconds: 0,
          startedAt: hostile,
          finishedAt: null,
          host: hostile,
          error: `line one\n${hostile}`,
          skippedByReason: { [hostile]: 1 },
        },
      ],
    });
    for (const line of text.split('\n')) expect(rawControls(line)).toEqual([]);
    expect(text).toContain('error: line one\\x0ax\\x1b]0;pwned\\x07\\x1b[2J\\u202e');
  });
});
