import { readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { ProviderFatalError } from '../../src/errors.js';
import { createLocalProvider } from '../../src/provider/local.js';
import { turnsWhile } from '../support/turns.js';

function cosine(a: Float32Array, b: Float32Array): number {
  let dot = 0;
  let na = 0;
  let nb = 0;
  for (let i = 0; i < a.length; i++) {
    dot += (a[i] as number) * (b[i] as number);
    na += (a[i] as number) ** 2;
    nb += (b[i] as number) ** 2;
  }
  return dot / Math.sqrt(na * nb);
}

describe('the local provider', () => {
  it('embeds offline into 512 finite dimensions, placing related texts closer than unrelated ones', async () => {
    const provider = await createLocalProvider();
    try {
      const { vectors } = await provider.embed([
        'Cheap meds online, buy viagra now with no prescription',
        'Discount pharmacy: order pills today, no doctor needed',
        'The quarterly board meeting is moved to Thursday at 10am',
      ]);
      expect(vectors).toHaveLength(3);
      for (const v of vectors) {
        expect(v).toHaveLength(512);
        expect(v.every(Number.isFinite)).toBe(true);
      }
      const [spamA, spamB, work] = vectors as [Float32Array, Float32Array, Float32Array];
      expect(cosine(spamA, spamB)).toBeGreaterThan(cosine(spamA, work) + 0.1);
      // Deterministic: the same text gives the same vector.
      const again = await provider.embed([
        'The quarterly board meeting is moved to Thursday at 10am',
      ]);
      expect(Array.from(again.vectors[0] as Float32Array)).toEqual(Array.from(work));
    } finally {
      await provider.close();
    }
  }, 60_000);

  // The model holds its thread for seconds on a long input (its tokenizer is
  // quadratic). On the main thread that starved every callback, a signal
  // handler's included; in its worker the main thread's loop keeps turning.
  // Counted, not timed: how many turns of the loop ran while the answer was
  // awaited (on the main thread: about one per chunk of 8 inputs).
  it('leaves the event loop free while it embeds a long input', async () => {
    const provider = await createLocalProvider();
    try {
      const { value, turns } = await turnsWhile(() =>
        provider.embed(['lorem ipsum dolor sit amet '.repeat(150), 'hi']),
      );
      const { vectors } = value;
      expect(vectors.map((v) => v.length)).toEqual([512, 512]);
      expect(turns).toBeGreaterThan(1_000);
    } finally {
      await provider.close();
    }
  }, 60_000);

  it("fails a call the model throws on with the provider's fatal error, and keeps serving", async () => {
    const provider = await createLocalProvider();
    try {
      const failed = provider.embed([42 as unknown as string]);
      await expect(failed).rejects.toBeInstanceOf(ProviderFatalError);
      await expect(failed).rejects.toThrow(
        /^the local model universal-sentence-encoder-lite failed: /,
      );
      expect((await provider.embed(['still here'])).vectors).toHaveLength(1);
    } finally {
      await provider.close();
    }
  }, 60_000);

  // A run with nothing to embed must not pay for the model (~0.5 s, ~115 MB):
  // its worker thread, and the model in it, start with the first real call.
  it('loads the model on the first call with inputs, not when created', async () => {
    const threads = () => readdirSync('/proc/self/task').length;
    const before = threads();
    const provider = await createLocalProvider();
    try {
      expect(threads(), 'created: no worker thread yet').toBe(before);
      expect((await provider.embed([])).vectors).toEqual([]);
      expect(threads(), 'nothing to embed: still none').toBe(before);
      expect((await provider.embed(['now it loads'])).vectors).toHaveLength(1);
      expect(threads()).toBeGreaterThan(before);
    } finally {
      await provider.close();
    }
  }, 60_000);

  it('holds no handle while idle, and after close() fails every call', async () => {
    const ports = () =>
      process.getActiveResourcesInfo().filter((kind) => kind === 'MessagePort').length;
    const before = ports();
    const provider = await createLocalProvider();
    expect(ports(), 'idle: the worker does not keep the process alive').toBe(before);
    const call = provider.embed(['a pending call keeps it alive']);
    expect(ports()).toBe(before + 1);
    await call;
    expect(ports()).toBe(before);
    // Loaded now: the first call was held alive by the load as well. This
    // one reaches the model's thread a few microtasks on, after the loaded
    // model it awaits; no answer can arrive between microtasks.
    const again = provider.embed(['and so does one made after the load']);
    for (let turn = 0; turn < 10 && ports() === before; turn++) await Promise.resolve();
    expect(ports()).toBe(before + 1);
    await again;
    expect(ports()).toBe(before);
    await provider.close();
    await provider.close();
    await expect(provider.embed(['too late'])).rejects.toThrow(
      'the local model universal-sentence-encoder-lite was closed',
    );
    expect(ports()).toBe(before);
  }, 60_000);
});
