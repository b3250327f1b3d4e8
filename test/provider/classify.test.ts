import { afterEach, describe, expect, it, vi } from 'vitest';
import {
  InputRejectedError,
  InvalidResponseError,
  ProviderFatalError,
  ProviderTransientError,
} from '../../src/errors.js';
import { tokenCount } from '../../src/provider/cl100k.js';
import { retryAfterMs } from '../../src/provider/classify.js';
import { createOpenAIProvider } from '../../src/provider/client.js';
import { type ErrorDialect, fakeEmbedding } from '../support/fake-openai.js';
import { providerFor, rejectionOf, useFakeServer } from './helpers.js';

const server = useFakeServer();
afterEach(() => {
  vi.useRealTimers();
});

const LONG = 'this input is far longer than the five token limit of the server.fake server';

describe('context-length errors', () => {
  const dialects: Array<{
    dialect: ErrorDialect;
    status: number;
    index: number | undefined;
    limitTokens: number | undefined;
  }> = [
    { dialect: 'openai', status: 400, index: 2, limitTokens: 5 },
    { dialect: 'openai-legacy', status: 400, index: undefined, limitTokens: 5 },
    { dialect: 'vllm', status: 400, index: undefined, limitTokens: 5 },
    { dialect: 'tei', status: 413, index: undefined, limitTokens: 5 },
    { dialect: 'ollama', status: 400, index: undefined, limitTokens: undefined },
    { dialect: 'litellm', status: 400, index: undefined, limitTokens: 5 },
  ];

  it.for(dialects)(
    'the $dialect dialect yields InputRejectedError(context_length) with index $index and limit $limitTokens',
    async ({ dialect, status, index, limitTokens }) => {
      Object.assign(server.fake.options, { dialect, maxInputTokens: 5 });
      const error = await rejectionOf(providerFor(server.fake).embed(['a', 'b', LONG, 'd']));
      expect(error).toBeInstanceOf(InputRejectedError);
      expect(error).toMatchObject({ reason: 'context_length', index, limitTokens, status });
    },
  );
});

describe('errors no retry can fix', () => {
  it('a 429 insufficient_quota is fatal and says to add credit rather than retry', async () => {
    server.fake.enqueueFault({ kind: 'insufficient-quota' });
    const error = await rejectionOf(providerFor(server.fake).embed(['x']));
    expect(error).toBeInstanceOf(ProviderFatalError);
    expect(error).toMatchObject({ status: 429 });
    expect((error as Error).message).toMatch(/quota/);
    expect((error as Error).message).toMatch(/add credit/);
  });

  it('a 401 for a wrong API key is fatal and names OPENAI_API_KEY', async () => {
    server.fake.options.apiKey = 'the-right-key';
    const error = await rejectionOf(
      providerFor(server.fake, { apiKey: 'a-wrong-key' }).embed(['x']),
    );
    expect(error).toBeInstanceOf(ProviderFatalError);
    expect(error).toMatchObject({ status: 401 });
    expect((error as Error).message).toContain('OPENAI_API_KEY');
  });

  it('a 404 for an unknown model is fatal and names the model', async () => {
    const error = await rejectionOf(
      providerFor(server.fake, { model: 'no-such-model' }).embed(['x']),
    );
    expect(error).toBeInstanceOf(ProviderFatalError);
    expect(error).toMatchObject({ status: 404 });
    expect((error as Error).message).toContain("'no-such-model'");
  });
});

/** Every secret below contains this; none may reach a message. */
const SECRET = /s3cr3t/;

describe('messages never quote a secret of the base URL', () => {
  // The SDK appends '/embeddings' to the base URL as a string, so a query
  // survives only when the base URL names the endpoint and ends in '#'.
  const withQuery = () => `${server.fake.url}?api-key=s3cr3t-query#s3cr3t-frag`;

  it('a 401 names the base URL redacted', async () => {
    server.fake.options.apiKey = 'the-right-key';
    const error = await rejectionOf(
      providerFor(server.fake, { apiKey: 'a-wrong-key', baseURL: withQuery() }).embed(['x']),
    );
    expect(error).toMatchObject({ status: 401 });
    expect((error as Error).message).toContain(`for ${server.fake.url}?api-key=***#***`);
    expect((error as Error).message).not.toMatch(SECRET);
  });

  it('a 404 for an unknown model names the base URL redacted', async () => {
    const error = await rejectionOf(
      providerFor(server.fake, { model: 'no-such-model', baseURL: withQuery() }).embed(['x']),
    );
    expect(error).toMatchObject({ status: 404 });
    expect((error as Error).message).toContain(`at ${server.fake.url}?api-key=***#***`);
    expect((error as Error).message).not.toMatch(SECRET);
  });

  it('a 404 for a wrong path with a query (the server echoes the path) names it redacted', async () => {
    const error = await rejectionOf(
      providerFor(server.fake, { baseURL: `${server.fake.url}/nope?api-key=s3cr3t-query` }).embed([
        'x',
      ]),
    );
    expect(error).toMatchObject({ status: 404 });
    expect((error as Error).message).not.toMatch(SECRET);
  });

  it("a base URL's query reaches every request, after the path the SDK appends", async () => {
    server.fake.reset();
    const result = await providerFor(server.fake, {
      baseURL: `${server.fake.url}?api-version=2024-02-01`,
    }).embed(['x']);
    expect(result.vectors).toHaveLength(1);
    expect(server.fake.stats.queries).toEqual(['?api-version=2024-02-01']);
  });

  it("a 4xx whose body echoes the request's query keeps it out of the message", async () => {
    server.fake.enqueueFault({
      kind: 'status',
      status: 422,
      body: { error: { message: 'bad request POST /v1/embeddings?api-key=s3cr3t-query' } },
    });
    const error = await rejectionOf(providerFor(server.fake).embed(['x']));
    expect(error).toBeInstanceOf(InputRejectedError);
    expect((error as Error).message).toContain('?api-key=***');
    expect((error as Error).message).not.toMatch(SECRET);
  });

  it('a base URL with user-info, which fetch refuses and quotes, is redacted in the connection error', async () => {
    const baseURL = server.fake.url.replace('http://', 'http://s3cr3t-user:s3cr3t-pass@');
    const error = await rejectionOf(providerFor(server.fake, { baseURL }).embed(['x']));
    expect(error).toBeInstanceOf(ProviderTransientError);
    expect((error as Error).message).toMatch(/credentials: http:\/\/\*\*\*@127\.0\.0\.1:/);
    expect((error as Error).message).not.toMatch(SECRET);
  });
});

describe('errors worth another attempt', () => {
  it.for([
    { header: 'retry-after-ms', fault: { retryAfterMs: 1234 }, expected: 1234 },
    { header: 'retry-after', fault: { retryAfterSeconds: 7 }, expected: 7000 },
    { header: 'x-ratelimit-reset-tokens 1.5s', fault: { resetTokens: '1.5s' }, expected: 1500 },
    { header: 'x-ratelimit-reset-tokens 6m0s', fault: { resetTokens: '6m0s' }, expected: 360_000 },
  ])(
    'a 429 rate limit is transient and takes retryAfterMs from $header',
    async ({ fault, expected }) => {
      server.fake.enqueueFault({ kind: 'rate-limit', ...fault });
      const error = await rejectionOf(providerFor(server.fake).embed(['x']));
      expect(error).toBeInstanceOf(ProviderTransientError);
      expect(error).toMatchObject({ status: 429, retryAfterMs: expected });
    },
  );

  it.for([500, 503])('a %i server error is transient', async (status) => {
    server.fake.enqueueFault({ kind: 'server-error', status });
    const error = await rejectionOf(providerFor(server.fake).embed(['x']));
    expect(error).toBeInstanceOf(ProviderTransientError);
    expect(error).toMatchObject({ status, retryAfterMs: undefined });
  });

  it('a dropped connection is transient', async () => {
    server.fake.enqueueFault({ kind: 'drop' });
    const error = await rejectionOf(providerFor(server.fake).embed(['x']));
    expect(error).toBeInstanceOf(ProviderTransientError);
    expect((error as Error).message).toMatch(/connection error/);
  });

  it('a response slower than timeoutMs is a transient "timed out"', async () => {
    // The SDK's request timeout and the server's hang both wait on the global
    // setTimeout, faked here: the client gives up when 200 ms of virtual time
    // have passed, not before, and long before the 5,000 ms hang would end.
    vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
    server.fake.enqueueFault({ kind: 'hang', ms: 5_000 });
    let settled = false;
    const rejected = rejectionOf(providerFor(server.fake, { timeoutMs: 200 }).embed(['x'])).finally(
      () => {
        settled = true;
      },
    );
    await server.fake.until((stats) => stats.delayed === 1);
    await vi.advanceTimersByTimeAsync(199);
    expect(settled).toBe(false);
    await vi.advanceTimersByTimeAsync(1);
    const error = await rejected;
    expect(error).toBeInstanceOf(ProviderTransientError);
    expect((error as Error).message).toMatch(/timed out/);
    // The hang never ended: the server sent no reply.
    expect(server.fake.stats.replies).toBe(0);
  });
});

describe('other client errors', () => {
  it('a generic 400 with no context-length text rejects the input as rejected_input', async () => {
    server.fake.enqueueFault({
      kind: 'status',
      status: 400,
      body: { error: { message: 'bad things', type: 'invalid_request_error' } },
    });
    const error = await rejectionOf(providerFor(server.fake).embed(['x', 'y']));
    expect(error).toBeInstanceOf(InputRejectedError);
    expect(error).toMatchObject({
      reason: 'rejected_input',
      index: undefined,
      limitTokens: undefined,
      status: 400,
    });
    expect((error as Error).message).toContain('bad things');
  });
});

describe('responses that break the contract', () => {
  const inputs = ['one', 'two', 'three'];

  it('a NaN in the first vector is an InvalidResponseError blaming index 0, never vectors', async () => {
    server.fake.enqueueFault({ kind: 'nan' });
    const error = await rejectionOf(providerFor(server.fake).embed(inputs));
    expect(error).toBeInstanceOf(InvalidResponseError);
    expect(error).toMatchObject({ index: 0 });
  });

  it('one embedding too few is an InvalidResponseError blaming no single index', async () => {
    server.fake.enqueueFault({ kind: 'wrong-count' });
    const error = await rejectionOf(providerFor(server.fake).embed(inputs));
    expect(error).toBeInstanceOf(InvalidResponseError);
    expect(error).toMatchObject({ index: undefined });
  });

  it('a vector of the wrong dimension is an InvalidResponseError blaming index 0', async () => {
    server.fake.enqueueFault({ kind: 'wrong-dimension' });
    const error = await rejectionOf(providerFor(server.fake).embed(inputs));
    expect(error).toBeInstanceOf(InvalidResponseError);
    expect(error).toMatchObject({ index: 0 });
  });

  it('with no dimension known beforehand, the odd vector out is still the one blamed', async () => {
    server.fake.enqueueFault({ kind: 'wrong-dimension' });
    const provider = providerFor(server.fake, { defaultDimensions: undefined });
    const error = await rejectionOf(provider.embed(inputs));
    expect(error).toBeInstanceOf(InvalidResponseError);
    expect(error).toMatchObject({ index: 0 });
    // A refused response must not teach the provider a dimension.
    expect(provider.expectedDimensions).toBeUndefined();
  });
});

describe('successful responses', () => {
  it('vectors are mapped by their index, not by position, when the server shuffles them', async () => {
    server.fake.options.shuffle = true;
    const texts = ['first', 'second', 'third', 'fourth'];
    const { vectors, promptTokens } = await providerFor(server.fake).embed(texts);
    expect(vectors).toHaveLength(texts.length);
    for (const [i, text] of texts.entries()) {
      expect(Array.from(vectors[i]!)).toEqual(Array.from(fakeEmbedding(text, 1536)));
    }
    expect(promptTokens).toBe(texts.reduce((n, t) => n + tokenCount(t), 0));
  });

  it('dimensions: 256 is sent to the server and the vectors have 256 values', async () => {
    const provider = providerFor(server.fake, { dimensions: 256 });
    expect(provider.expectedDimensions).toBe(256);
    const texts = ['short', 'vectors'];
    const { vectors } = await provider.embed(texts);
    for (const [i, text] of texts.entries()) {
      expect(vectors[i]).toHaveLength(256);
      expect(Array.from(vectors[i]!)).toEqual(Array.from(fakeEmbedding(text, 256)));
    }
  });

  it('the dimension is learnt from the first response when none is configured', async () => {
    const provider = providerFor(server.fake, { defaultDimensions: undefined });
    expect(provider.expectedDimensions).toBeUndefined();
    await provider.embed(['learn']);
    expect(provider.expectedDimensions).toBe(1536);
  });
});

describe('retryAfterMs', () => {
  it('reads retry-after-ms as milliseconds', () => {
    expect(retryAfterMs(new Headers({ 'retry-after-ms': '250' }))).toBe(250);
    expect(retryAfterMs(new Headers({ 'retry-after-ms': '0' }))).toBe(0);
  });

  it('prefers retry-after-ms over retry-after', () => {
    expect(retryAfterMs(new Headers({ 'retry-after-ms': '250', 'retry-after': '9' }))).toBe(250);
  });

  it('reads retry-after as seconds, fractional ones too', () => {
    expect(retryAfterMs(new Headers({ 'retry-after': '2' }))).toBe(2000);
    expect(retryAfterMs(new Headers({ 'retry-after': '0.5' }))).toBe(500);
  });

  it('reads retry-after as an HTTP date, counting from now', () => {
    // A fixed clock, 250 ms into a second: the HTTP-date form has whole-second
    // resolution, so the wait is to the start of the second named.
    vi.useFakeTimers({ now: Date.UTC(2025, 0, 1, 12, 0, 0, 250), toFake: ['Date'] });
    const inTenSeconds = 'Wed, 01 Jan 2025 12:00:10 GMT';
    expect(retryAfterMs(new Headers({ 'retry-after': inTenSeconds }))).toBe(9_750);
  });

  it('treats an HTTP date in the past as no wait', () => {
    vi.useFakeTimers({ now: Date.UTC(2025, 0, 1, 12, 0, 0), toFake: ['Date'] });
    const past = 'Wed, 01 Jan 2025 11:59:00 GMT';
    expect(retryAfterMs(new Headers({ 'retry-after': past }))).toBe(0);
  });

  it('reads the x-ratelimit-reset durations OpenAI sends', () => {
    const reset = (value: string) =>
      retryAfterMs(new Headers({ 'x-ratelimit-reset-tokens': value }));
    expect(reset('20ms')).toBe(20);
    expect(reset('1s')).toBe(1000);
    expect(reset('1.5s')).toBe(1500);
    expect(reset('6m0s')).toBe(360_000);
    expect(reset('1h2m3s')).toBe(3_723_000);
  });

  it('waits for the reset of the budget that ran out, not the longer one', () => {
    // OpenAI sends both resets on every 429; a request-limit 429 must not wait
    // out a six-minute token window.
    const requestsOut = new Headers({
      'x-ratelimit-reset-requests': '120ms',
      'x-ratelimit-remaining-requests': '0',
      'x-ratelimit-reset-tokens': '6m0s',
      'x-ratelimit-remaining-tokens': '52000',
    });
    expect(retryAfterMs(requestsOut)).toBe(120);
    const tokensOut = new Headers({
      'x-ratelimit-reset-requests': '120ms',
      'x-ratelimit-remaining-requests': '40',
      'x-ratelimit-reset-tokens': '2s',
      'x-ratelimit-remaining-tokens': '0',
    });
    expect(retryAfterMs(tokensOut)).toBe(2000);
  });

  it('takes the shorter reset when the headers do not say which budget ran out', () => {
    const headers = new Headers({
      'x-ratelimit-reset-requests': '120ms',
      'x-ratelimit-reset-tokens': '2s',
    });
    expect(retryAfterMs(headers)).toBe(120);
  });

  it('returns undefined when no header says how long to wait', () => {
    expect(retryAfterMs(undefined)).toBeUndefined();
    expect(retryAfterMs(new Headers())).toBeUndefined();
    expect(retryAfterMs(new Headers({ 'retry-after': 'soon', 'retry-after-ms': 'x' }))).toBe(
      undefined,
    );
  });
});

describe('errors about the request rather than an input', () => {
  it('treats a 400 naming the dimensions parameter as fatal, since every input would fail alike', async () => {
    server.fake.enqueueFault({
      kind: 'status',
      status: 400,
      body: {
        error: {
          message: 'This model does not support specifying dimensions.',
          type: 'invalid_request_error',
          param: 'dimensions',
          code: null,
        },
      },
    });
    const provider = createOpenAIProvider({
      apiKey: 'test',
      baseURL: server.fake.url,
      model: 'text-embedding-ada-002',
      dimensions: 256,
      defaultDimensions: undefined,
      timeoutMs: 5000,
    });
    const error = await provider.embed(['a', 'b']).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ProviderFatalError);
    expect((error as Error).message).toMatch(/'dimensions'.*--dimensions/);
    expect((error as Error).name).toBe('ProviderFatalError');
  });

  it('does not mistake a 503 that quotes the context-length wording for an input problem', async () => {
    server.fake.enqueueFault({
      kind: 'status',
      status: 503,
      body: { error: { message: "upstream: This model's maximum context length is 8192 tokens" } },
    });
    const provider = createOpenAIProvider({
      apiKey: 'test',
      baseURL: server.fake.url,
      model: 'text-embedding-3-small',
      dimensions: undefined,
      defaultDimensions: 1536,
      timeoutMs: 5000,
    });
    const error = await provider.embed(['a']).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(ProviderTransientError);
  });
});
