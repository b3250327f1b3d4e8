import { describe, expect, it } from 'vitest';
import { tokenCount } from '../../src/provider/cl100k.js';
import { stopCountingThread } from '../../src/provider/tokens.js';
import type { EligibleMessage } from '../../src/sql/messages.js';
import {
  answeredTokens,
  cutAtFirstFailure,
  prepareBatch,
  requestParts,
} from '../../src/worker/batch.js';

const message = (id: number, content: string) => ({ id: String(id), content }) as EligibleMessage;
// 1,000 'é' are 2,000 UTF-8 bytes and 1,000 tokens; 1,200 words are 6,000 bytes and 1,201 tokens.
const SHORT = 'see you tomorrow at three';
const WIDE = 'é'.repeat(1000);
const LONG = 'word '.repeat(1200);

describe('prepareBatch', () => {
  it('counts only the inputs whose UTF-8 length is over the limit, unless asked to count all', async () => {
    const messages = [message(1, SHORT), message(2, WIDE), message(3, LONG)];
    const limit = 1500;
    const prepared = await prepareBatch(messages, {
      maxInputTokens: limit,
      truncate: false,
      countAll: false,
    });
    // SHORT: 25 bytes, it cannot be over 1,500 tokens. WIDE: 2,000 bytes, counted,
    // and within. LONG: 6,000 bytes, counted, and within.
    expect(prepared.failed).toEqual([]);
    expect(prepared.toSend.map((i) => [i.tokens, i.bytes])).toEqual([
      [undefined, 25],
      [tokenCount(WIDE), 2000],
      [tokenCount(LONG), 6000],
    ]);
    const all = await prepareBatch(messages, {
      maxInputTokens: limit,
      truncate: false,
      countAll: true,
    });
    expect(all.toSend.map((i) => i.tokens)).toEqual(messages.map((m) => tokenCount(m.content)));
  });

  it('fails an input over the limit, counted only up to it; strict mode counts the culprit in full', async () => {
    const limit = tokenCount(LONG) - 1;
    const prepared = await prepareBatch([message(1, SHORT), message(2, LONG), message(3, SHORT)], {
      maxInputTokens: limit,
      truncate: false,
      countAll: false,
    });
    expect(prepared.toSend.map((i) => i.message.id)).toEqual(['1', '3']);
    expect(prepared.failed).toMatchObject([
      { position: 1, reason: 'context_length', tokens: undefined, limitTokens: limit },
    ]);
    expect(prepared.failed[0]?.detail).toBe(
      `over the ${limit}-token limit (counted up to it before sending; no API call made)`,
    );
    const cut = await cutAtFirstFailure(prepared);
    expect(cut.toSend.map((i) => i.message.id)).toEqual(['1']);
    expect(cut.failed).toMatchObject([{ position: 1, tokens: tokenCount(LONG) }]);
    expect(cut.failed[0]?.detail).toBe(
      `${tokenCount(LONG)} tokens, over the ${limit}-token limit (counted before sending; no API call made)`,
    );
  });

  it('cuts requests by the bytes of uncounted inputs, counting only where the bound would cut short', async () => {
    const prepared = await prepareBatch([message(1, SHORT), message(2, SHORT), message(3, SHORT)], {
      maxInputTokens: undefined,
      truncate: false,
      countAll: false,
    });
    // 25 bytes and 5 tokens each. Under a cap of 60, two fit by their bytes;
    // the third's bound would pass it, so it is counted, and fits too.
    const parts = await requestParts(prepared.toSend, {
      maxRequestInputs: 10,
      maxRequestTokens: 60,
    });
    expect(parts.map((p) => p.length)).toEqual([3]);
    expect(prepared.toSend.map((i) => i.tokens)).toEqual([undefined, undefined, tokenCount(SHORT)]);
    // Under a cap of 9 tokens, one a request, by exact counts.
    const narrow = await requestParts(prepared.toSend, {
      maxRequestInputs: 10,
      maxRequestTokens: 9,
    });
    expect(narrow.map((p) => p.length)).toEqual([1, 1, 1]);
  });

  // The counting thread stopped while a count waits on it: each place keeps
  // what it needs without the count. stopCountingThread fails the waiting
  // count at once, so the order is fixed, not raced.
  describe('when the counting thread fails', () => {
    it('strict mode still names the culprit and the limit', async () => {
      const limit = tokenCount(LONG) - 1;
      const prepared = await prepareBatch([message(1, SHORT), message(2, LONG)], {
        maxInputTokens: limit,
        truncate: false,
        countAll: false,
      });
      const cutting = cutAtFirstFailure(prepared);
      await stopCountingThread();
      const cut = await cutting;
      expect(cut.toSend.map((i) => i.message.id)).toEqual(['1']);
      expect(cut.failed).toMatchObject([{ position: 1, tokens: undefined, limitTokens: limit }]);
      expect(cut.failed[0]?.detail).toBe(
        `over the ${limit}-token limit (counted up to it before sending; no API call made)`,
      );
    });

    it('requests are cut by the bytes, the bound', async () => {
      const prepared = await prepareBatch(
        [message(1, SHORT), message(2, SHORT), message(3, SHORT)],
        {
          maxInputTokens: undefined,
          truncate: false,
          countAll: false,
        },
      );
      const cutting = requestParts(prepared.toSend, { maxRequestInputs: 10, maxRequestTokens: 60 });
      await stopCountingThread();
      expect((await cutting).map((p) => p.length)).toEqual([2, 1]);
      expect(prepared.toSend.map((i) => i.tokens)).toEqual([undefined, undefined, undefined]);
    });
  });
});

describe('answeredTokens', () => {
  const inputs = (texts: string[], counted: boolean[]) =>
    texts.map((text, position) => ({
      position,
      message: message(position + 1, text),
      text,
      tokens: counted[position] ? tokenCount(text) : undefined,
      bytes: Buffer.byteLength(text, 'utf8'),
      truncated: false,
    }));

  it("shares the provider's reported tokens by UTF-8 length, adding up to the report exactly", async () => {
    const given = inputs(['a'.repeat(10), 'b'.repeat(20), 'c'.repeat(30)], [false, false, false]);
    const shares = await answeredTokens(given, 100);
    expect(shares.reduce((a, b) => a + b, 0)).toBe(100);
    expect(shares).toEqual([17, 33, 50]);
  });

  it('keeps the counted inputs exact and shares only the rest', async () => {
    const given = inputs([LONG, 'a'.repeat(10), 'b'.repeat(30)], [true, false, false]);
    const report = tokenCount(LONG) + 40;
    expect(await answeredTokens(given, report)).toEqual([tokenCount(LONG), 10, 30]);
  });

  it('counts the inputs when the provider reports nothing', async () => {
    const given = inputs([SHORT, WIDE], [false, false]);
    expect(await answeredTokens(given, undefined)).toEqual([tokenCount(SHORT), tokenCount(WIDE)]);
  });

  // The answer is in hand and billed: a failed count must not cost its vectors.
  it('counts on this thread when the counting thread fails meanwhile', async () => {
    const given = inputs([SHORT, WIDE], [false, false]);
    const counting = answeredTokens(given, undefined);
    await stopCountingThread();
    expect(await counting).toEqual([tokenCount(SHORT), tokenCount(WIDE)]);
  });
});
