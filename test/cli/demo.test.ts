import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { runCli } from '../support/cli.js';

describe('npm run demo', () => {
  const cwd = mkdtempSync(join(tmpdir(), 'pgembed-demo-'));
  afterAll(() => rmSync(cwd, { recursive: true, force: true }));

  it('seeds the corpus, embeds offline with no key or server, shows the status and searches, in its own database', async () => {
    // Every OpenAI and database setting is blank, as on a fresh machine.
    const result = await runCli('demo', ['--limit', '24'], {}, { cwd, timeoutMs: 180_000 });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toContain('seeded 6046 messages');
    expect(result.stderr).toMatch(
      /run 1 succeeded: local\/universal-sentence-encoder-lite\n {2}embedded 24/,
    );
    expect(result.stdout).toContain(
      'local/universal-sentence-encoder-lite: 24 / 6,046 (0.4%), stale 0, missing 6,022',
    );
    expect(result.stdout).toMatch(
      /nearest to "computer virus spreading by email"[^\n]*\n {2}1\. 0\.\d{3} {2}message \d+ {2}Subject: /,
    );
  }, 200_000);
});
