import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { describe, expect, it } from 'vitest';
import { TokenCountError } from '../../src/errors.js';
import * as mainThread from '../../src/provider/cl100k.js';
import {
  countTokens,
  countTokensWithin,
  stopCountingThread,
  truncateWithin,
} from '../../src/provider/tokens.js';
import { repoRoot } from '../support/cli.js';

const TEXTS = [
  '',
  'hello world',
  'お誕生日おめでとう',
  'an email quoting <|endoftext|> and <|im_start|>',
  '😀😀😀😀 héllo 日本語のテキスト🎉🎉 '.repeat(500),
];

describe('countTokens, on the counting thread', () => {
  it('counts as cl100k does, in order, whatever the text', async () => {
    expect(await countTokens(TEXTS)).toEqual(TEXTS.map(mainThread.tokenCount));
    expect(await countTokens([])).toEqual([]);
  });

  it('counts up to a limit: the count within it, undefined past it', async () => {
    const counts = TEXTS.map(mainThread.tokenCount);
    const limit = 20;
    expect(await countTokensWithin(TEXTS, limit)).toEqual(
      counts.map((n) => (n <= limit ? n : undefined)),
    );
    expect(await countTokensWithin(['hello world'], 2)).toEqual([2]);
    expect(await countTokensWithin(['hello world'], 1)).toEqual([undefined]);
  });

  it('answers calls made together each with its own counts', async () => {
    const answers = await Promise.all(TEXTS.map((text) => countTokens([text, text])));
    expect(answers).toEqual(
      TEXTS.map((text) => [mainThread.tokenCount(text)].flatMap((n) => [n, n])),
    );
  });

  it('cuts a text within a limit as the main thread would', async () => {
    const text = '日本語のテキストです。お誕生日おめでとう '.repeat(200);
    for (const limit of [1, 7, 100, 8192]) {
      expect(await truncateWithin(text, limit)).toEqual(mainThread.truncateWithin(text, limit));
    }
  });

  it('fails a count it cannot make with a TokenCountError, and counts again after', async () => {
    const notText = null as unknown as string;
    await expect(countTokens(['fine', notText])).rejects.toBeInstanceOf(TokenCountError);
    expect(await countTokens(['hello world'])).toEqual([2]);
  });

  it('fails the counts waiting on a stopped thread, and starts another for the next', async () => {
    expect(await countTokens(['warm'])).toEqual([1]);
    const waiting = countTokens(['hello world']);
    // Handled before the stop rejects it.
    const failed = expect(waiting).rejects.toThrow(
      new TokenCountError('the token-counting thread was stopped'),
    );
    await stopCountingThread();
    await failed;
    await expect(waiting).rejects.toBeInstanceOf(TokenCountError);
    await stopCountingThread();
    expect(await countTokens(['hello world'])).toEqual([2]);
  });

  it('never loads cl100k on the main thread, and lets the process exit while idle', () => {
    // A fresh process of the built module: what this one loaded cannot blur it.
    const built = pathToFileURL(join(repoRoot, 'dist', 'src', 'provider', 'tokens.js')).href;
    const script = `
      import { createRequire } from 'node:module';
      const { countTokens } = await import(${JSON.stringify(built)});
      const counts = await countTokens(['hello world', 'tiktoken is great!']);
      const loaded = Object.keys(createRequire(import.meta.url).cache)
        .filter((file) => file.includes('gpt-tokenizer'));
      console.log(JSON.stringify({ counts, loaded }));`;
    const dir = mkdtempSync(join(tmpdir(), 'pgembed-tokens-'));
    try {
      const file = join(dir, 'count.mjs');
      writeFileSync(file, script);
      // execFileSync returns only once the process has exited: an idle
      // counting thread that held it open would time the test out.
      const out = execFileSync(process.execPath, [file], { encoding: 'utf8', timeout: 50_000 });
      expect(JSON.parse(out)).toEqual({ counts: [2, 6], loaded: [] });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
