import { afterAll, beforeAll, beforeEach } from 'vitest';
import { createOpenAIProvider, type OpenAIProviderOptions } from '../../src/provider/client.js';
import {
  type FakeOpenAI,
  type FakeOpenAIOptions,
  startFakeOpenAI,
} from '../support/fake-openai.js';

export const MODEL = 'text-embedding-3-small';

export function providerFor(fake: FakeOpenAI, overrides: Partial<OpenAIProviderOptions> = {}) {
  return createOpenAIProvider({
    apiKey: 'test-key',
    baseURL: fake.url,
    model: MODEL,
    dimensions: undefined,
    defaultDimensions: 1536,
    timeoutMs: 5_000,
    ...overrides,
  });
}

/** The rejection of `promise`; fails the test if it resolves instead. */
export async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (error) {
    return error;
  }
  throw new Error('expected a rejection, but the promise resolved');
}

/**
 * Returns a function that puts the fake's options back as they were: reset()
 * deliberately leaves options alone, and tests here mutate them.
 */
export function optionsRestorer(fake: FakeOpenAI): () => void {
  const initial = structuredClone(fake.options);
  return () => {
    const opts = fake.options as Record<string, unknown>;
    for (const key of Object.keys(opts)) delete opts[key];
    Object.assign(opts, structuredClone(initial) satisfies FakeOpenAIOptions);
  };
}

/** This file's fake server, with its stats and options put back before each test. */
export function useFakeServer(): { readonly fake: FakeOpenAI } {
  const handle = {} as { fake: FakeOpenAI };
  let restoreOptions: () => void;
  beforeAll(async () => {
    handle.fake = await startFakeOpenAI();
    restoreOptions = optionsRestorer(handle.fake);
  });
  afterAll(async () => {
    await handle.fake?.close();
  });
  beforeEach(() => {
    handle.fake.reset();
    restoreOptions();
  });
  return handle;
}
