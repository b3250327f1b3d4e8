import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { InvalidResponseError } from '../../src/errors.js';
import { type FakeOpenAI, fakeEmbedding, startFakeOpenAI } from '../support/fake-openai.js';
import { providerFor, rejectionOf } from './helpers.js';

let fake: FakeOpenAI;
let proxy: Server;
let proxyUrl: string;
const forwarded: unknown[] = [];

/**
 * A real HTTP hop in front of the fake that drops `encoding_format`, so the
 * fake answers with float arrays: what servers that ignore the field do
 * (LocalAI before 2026, Infinity, older LitServe, SGLang).
 */
beforeAll(async () => {
  fake = await startFakeOpenAI();
  proxy = createServer(async (req, res) => {
    const chunks: Buffer[] = [];
    for await (const chunk of req) chunks.push(chunk as Buffer);
    const body = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Record<string, unknown>;
    forwarded.push(body.encoding_format);
    delete body.encoding_format;
    const upstream = await fetch(`${fake.url}/embeddings`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify(body),
    });
    res.writeHead(upstream.status, { 'content-type': 'application/json' });
    res.end(await upstream.text());
  });
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
  proxyUrl = `http://127.0.0.1:${(proxy.address() as AddressInfo).port}/v1`;
});

afterAll(async () => {
  proxy.closeAllConnections();
  await new Promise<void>((resolve, reject) => proxy.close((e) => (e ? reject(e) : resolve())));
  await fake.close();
});

beforeEach(() => {
  fake.reset();
  forwarded.length = 0;
});

describe('the wire format of embeddings', () => {
  it('base64 embeddings from an OpenAI-style server decode to the exact vectors', async () => {
    const texts = ['alpha', 'beta'];
    const { vectors } = await providerFor(fake).embed(texts);
    for (const [i, text] of texts.entries()) {
      expect(Array.from(vectors[i]!)).toEqual(Array.from(fakeEmbedding(text, 1536)));
    }
  });

  it('float arrays from a server that ignores encoding_format give the same exact vectors', async () => {
    const texts = ['alpha', 'beta', 'gamma'];
    // No known dimension: the case where a quarter-length garbage vector would go unnoticed.
    const provider = providerFor(fake, {
      baseURL: proxyUrl,
      model: 'text-embedding-3-small',
      defaultDimensions: undefined,
    });
    const { vectors } = await provider.embed(texts);
    expect(forwarded).toEqual(['base64']);
    for (const [i, text] of texts.entries()) {
      expect(vectors[i]).toHaveLength(1536);
      expect(Array.from(vectors[i]!)).toEqual(Array.from(fakeEmbedding(text, 1536)));
    }
    expect(provider.expectedDimensions).toBe(1536);
  });

  it('a NaN sent as JSON null in a float array is refused, not stored as 0', async () => {
    fake.enqueueFault({ kind: 'nan' });
    const provider = providerFor(fake, { baseURL: proxyUrl });
    const error = await rejectionOf(provider.embed(['alpha', 'beta']));
    expect(error).toBeInstanceOf(InvalidResponseError);
    expect(error).toMatchObject({ index: 0 });
  });
});
