import { countTokens } from 'gpt-tokenizer/encoding/cl100k_base';
import OpenAI from 'openai';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, test, vi } from 'vitest';
import {
  type ErrorDialect,
  type FakeOpenAI,
  type FakeOpenAIOptions,
  fakeEmbedding,
  startFakeOpenAI,
} from './fake-openai.js';

const MODEL = 'text-embedding-3-small';

let fake: FakeOpenAI;
let client: OpenAI;
let initialOptions: FakeOpenAIOptions;

beforeAll(async () => {
  fake = await startFakeOpenAI();
  initialOptions = structuredClone(fake.options);
  // maxRetries: 0 so every fault reaches the test instead of being retried away by the SDK.
  client = new OpenAI({ baseURL: fake.url, apiKey: 'test', maxRetries: 0 });
});

afterAll(async () => {
  await fake.close();
});

beforeEach(() => {
  fake.reset();
  // reset() deliberately leaves options alone; tests here mutate them, so restore by hand.
  const opts = fake.options as Record<string, unknown>;
  for (const key of Object.keys(opts)) delete opts[key];
  Object.assign(opts, structuredClone(initialOptions));
});

afterEach(() => {
  vi.useRealTimers();
});

/**
 * Fake setTimeout only: the server's latency and hang waits, and the SDK's
 * request timeout, then run in virtual time while the sockets stay real.
 */
function virtualTimers(): void {
  vi.useFakeTimers({ toFake: ['setTimeout', 'clearTimeout'] });
}

async function rejectionOf(promise: Promise<unknown>): Promise<unknown> {
  try {
    await promise;
  } catch (err) {
    return err;
  }
  throw new Error('expected the request to fail, but it succeeded');
}

function embed(input: string | string[], extra: Partial<OpenAI.EmbeddingCreateParams> = {}) {
  return client.embeddings.create({ model: MODEL, input, ...extra });
}

describe('fakeEmbedding', () => {
  test('it is deterministic, distinct per text and L2-normalised', () => {
    const a = fakeEmbedding('hello', 64);
    expect(Array.from(fakeEmbedding('hello', 64))).toEqual(Array.from(a));
    expect(Array.from(fakeEmbedding('hello!', 64))).not.toEqual(Array.from(a));
    const norm = Math.hypot(...a);
    expect(norm).toBeCloseTo(1, 5);
  });

  test('a shorter vector is the renormalised prefix of a longer one, like OpenAI dimensions', () => {
    const long = fakeEmbedding('prefix', 256);
    const short = fakeEmbedding('prefix', 8);
    const head = long.slice(0, 8);
    const scale = 1 / Math.hypot(...head);
    for (let i = 0; i < 8; i++) expect(short[i]).toBeCloseTo(head[i]! * scale, 6);
  });
});

describe('successful embeddings', () => {
  test('the SDK default base64 path returns vectors exactly equal to fakeEmbedding', async () => {
    const texts = ['alpha', 'beta', 'a somewhat longer sentence about gamma rays'];
    const res = await embed(texts);
    expect(res.object).toBe('list');
    expect(res.model).toBe(MODEL);
    expect(res.data).toHaveLength(3);
    for (const [i, text] of texts.entries()) {
      expect(res.data[i]!.index).toBe(i);
      expect(res.data[i]!.embedding).toEqual(Array.from(fakeEmbedding(text, 1536)));
    }
    const tokens = texts.reduce((n, t) => n + countTokens(t), 0);
    expect(res.usage).toEqual({ prompt_tokens: tokens, total_tokens: tokens });
  });

  test('float encoding returns the same float32 values as plain JSON numbers', async () => {
    const res = await embed(['alpha', 'beta'], { encoding_format: 'float' });
    for (const [i, text] of ['alpha', 'beta'].entries()) {
      const got = res.data[i]!.embedding;
      expect(got).toEqual(Array.from(fakeEmbedding(text, 1536)));
      expect(got.every((x) => Math.fround(x) === x)).toBe(true);
    }
  });

  test('the request dimensions parameter overrides the default vector size', async () => {
    const res = await embed('short vector', { dimensions: 256 });
    expect(res.data[0]!.embedding).toHaveLength(256);
    expect(res.data[0]!.embedding).toEqual(Array.from(fakeEmbedding('short vector', 256)));
  });

  test('the server-wide dimensions option is the default when the request has none', async () => {
    fake.options.dimensions = 32;
    const res = await embed('x', { encoding_format: 'float' });
    expect(res.data[0]!.embedding).toHaveLength(32);
  });

  test('a single string input is accepted and the un-prefixed /embeddings path also works', async () => {
    const bare = new OpenAI({
      baseURL: fake.url.replace(/\/v1$/, ''),
      apiKey: 'test',
      maxRetries: 0,
    });
    const res = await bare.embeddings.create({ model: MODEL, input: 'solo' });
    expect(res.data[0]!.embedding).toEqual(Array.from(fakeEmbedding('solo', 1536)));
  });

  test('shuffle scrambles the data order but every item keeps its correct index label', async () => {
    fake.options.shuffle = true;
    const texts = ['zero', 'one', 'two', 'three'];
    const res = await embed(texts);
    expect(res.data.map((d) => d.index)).not.toEqual([0, 1, 2, 3]);
    const byIndex = new Map(res.data.map((d) => [d.index, d.embedding]));
    for (const [i, text] of texts.entries()) {
      expect(byIndex.get(i)).toEqual(Array.from(fakeEmbedding(text, 1536)));
    }
  });

  test('special-token lookalikes in the input are embedded as ordinary text', async () => {
    const text = 'spam <|endoftext|> more';
    const res = await embed(text);
    expect(res.usage.prompt_tokens).toBe(countTokens(text, { disallowedSpecial: new Set() }));
  });

  test('latencyMs delays every response, concurrent requests side by side', async () => {
    virtualTimers();
    fake.options.latencyMs = 150;
    const both = Promise.all([embed('a'), embed('b')]);
    await fake.until((stats) => stats.delayed === 2);
    vi.advanceTimersByTime(149);
    expect(fake.stats).toMatchObject({ delayed: 2, replies: 0 });
    // One more virtual millisecond answers both: their waits overlapped, not queued.
    vi.advanceTimersByTime(1);
    await fake.until((stats) => stats.replies === 2);
    expect((await both).map((res) => res.data.length)).toEqual([1, 1]);
  });
});

describe('context-length errors per dialect', () => {
  // "one two ... seven" is 7 cl100k tokens; the limit is set to 5 so input[1] is the first offender.
  const inputs = [
    'ok',
    'one two three four five six seven',
    'eight nine ten eleven twelve thirteen',
  ];

  const cases: {
    dialect: ErrorDialect;
    status: number;
    error: unknown;
    message: string;
  }[] = [
    {
      dialect: 'openai',
      status: 400,
      error: {
        message: "Invalid 'input[1]': maximum input length is 5 tokens.",
        type: 'invalid_request_error',
        param: 'input',
        code: null,
      },
      message: "400 Invalid 'input[1]': maximum input length is 5 tokens.",
    },
    {
      dialect: 'openai-legacy',
      status: 400,
      error: {
        message:
          "This model's maximum context length is 5 tokens, however you requested 7 tokens (7 in your prompt; 0 for the completion). Please reduce your prompt; or completion length.",
        type: 'invalid_request_error',
        param: null,
        code: null,
      },
      message:
        "400 This model's maximum context length is 5 tokens, however you requested 7 tokens",
    },
    {
      // The SDK only keeps body.error; vLLM's top-level message is dropped entirely.
      dialect: 'vllm',
      status: 400,
      error: undefined,
      message: '400 status code (no body)',
    },
    {
      // A bare string in body.error becomes err.error, and the message JSON-quotes it.
      dialect: 'tei',
      status: 413,
      error: 'Input validation error: `inputs` must have less than 5 tokens. Given: 7',
      message: '413 "Input validation error: `inputs` must have less than 5 tokens. Given: 7"',
    },
    {
      dialect: 'ollama',
      status: 400,
      error: 'the input length exceeds the context length',
      message: '400 "the input length exceeds the context length"',
    },
    {
      dialect: 'litellm',
      status: 400,
      error: {
        message:
          "litellm.ContextWindowExceededError: litellm.BadRequestError: ContextWindowExceededError: OpenAIException - This model's maximum context length is 5 tokens. However, your messages resulted in 7 tokens.",
        type: null,
        param: null,
        code: '400',
      },
      message: '400 litellm.ContextWindowExceededError:',
    },
  ];

  test.each(cases)(
    'the $dialect dialect surfaces as an APIError with status $status and the expected body',
    async ({ dialect, status, error, message }) => {
      fake.options.maxInputTokens = 5;
      fake.options.dialect = dialect;
      const err = await rejectionOf(embed(inputs));
      expect(err).toBeInstanceOf(OpenAI.APIError);
      const apiErr = err as InstanceType<typeof OpenAI.APIError>;
      expect(apiErr.status).toBe(status);
      expect(apiErr.error).toEqual(error);
      expect(apiErr.message.startsWith(message)).toBe(true);
      // Nothing from a rejected batch counts as embedded.
      expect(fake.stats.inputsEmbedded).toBe(0);
      expect(fake.stats.seen.size).toBe(0);
    },
  );

  // Recovering that body is the client's job: see BodyKeepingOpenAI in
  // src/provider/client.ts and the vllm case in test/provider/classify.test.ts.

  test('an input exactly at the limit is accepted', async () => {
    fake.options.maxInputTokens = 7;
    const res = await embed(inputs[1]!);
    expect(res.usage.prompt_tokens).toBe(7);
  });

  test('counts primed or cached are the exact counts, and follow a change of limit', async () => {
    const texts = ['hello there', 'a little longer text with more words in it'];
    fake.primeTokenCounts(texts);
    const exact = texts.map((t) => countTokens(t));
    expect((await embed(texts)).usage.prompt_tokens).toBe(exact[0]! + exact[1]!);
    // Counted under 8,192 and cached: a lower limit must count again, not reuse it.
    fake.options.maxInputTokens = exact[1]! - 1;
    expect((await rejectionOf(embed(texts))) as Error).toBeInstanceOf(OpenAI.BadRequestError);
    expect((await embed(texts[0]!)).usage.prompt_tokens).toBe(exact[0]);
  });
});

describe('injected faults', () => {
  test('rate-limit faults send 429 with retry headers the SDK exposes on err.headers', async () => {
    fake.enqueueFault({
      kind: 'rate-limit',
      retryAfterMs: 250,
      retryAfterSeconds: 1,
      resetTokens: '6m0s',
    });
    const err = await rejectionOf(embed('x'));
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    const rl = err as InstanceType<typeof OpenAI.RateLimitError>;
    expect(rl.status).toBe(429);
    expect(rl.headers.get('retry-after-ms')).toBe('250');
    expect(rl.headers.get('retry-after')).toBe('1');
    expect(rl.headers.get('x-ratelimit-reset-tokens')).toBe('6m0s');
    expect(rl.headers.get('content-type')).toBe('application/json');
    expect(rl.requestID).toMatch(/^req_/);
    expect(rl.code).toBe('rate_limit_exceeded');
    expect(rl.type).toBe('requests');
    expect(fake.stats.rateLimited).toBe(1);
  });

  test('insufficient-quota is a 429 whose code is insufficient_quota', async () => {
    fake.enqueueFault({ kind: 'insufficient-quota' });
    const err = await rejectionOf(embed('x'));
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    const q = err as InstanceType<typeof OpenAI.RateLimitError>;
    expect(q.code).toBe('insufficient_quota');
    expect(q.type).toBe('insufficient_quota');
    expect(q.message).toContain('You exceeded your current quota');
    expect(q.headers.get('retry-after')).toBeNull();
    expect(fake.stats.rateLimited).toBe(1);
  });

  test('server-error and arbitrary status faults carry their status, body and headers', async () => {
    fake.enqueueFault(
      { kind: 'server-error' },
      { kind: 'server-error', status: 503 },
      {
        kind: 'status',
        status: 418,
        body: { error: { message: 'teapot' } },
        headers: { 'x-a': 'b' },
      },
    );
    const e500 = await rejectionOf(embed('x'));
    expect(e500).toBeInstanceOf(OpenAI.InternalServerError);
    expect((e500 as InstanceType<typeof OpenAI.APIError>).status).toBe(500);
    const e503 = await rejectionOf(embed('x'));
    expect((e503 as InstanceType<typeof OpenAI.APIError>).status).toBe(503);
    const e418 = (await rejectionOf(embed('x'))) as InstanceType<typeof OpenAI.APIError>;
    expect(e418.status).toBe(418);
    expect(e418.error).toEqual({ message: 'teapot' });
    expect(e418.headers?.get('x-a')).toBe('b');
  });

  test('a dropped connection surfaces as APIConnectionError and the server keeps working', async () => {
    fake.enqueueFault({ kind: 'drop' });
    const err = await rejectionOf(embed('x'));
    expect(err).toBeInstanceOf(OpenAI.APIConnectionError);
    expect(err).not.toBeInstanceOf(OpenAI.APIConnectionTimeoutError);
    await expect(embed('x')).resolves.toBeDefined();
  });

  test('a hang longer than the SDK timeout gives APIConnectionTimeoutError', async () => {
    virtualTimers();
    fake.enqueueFault({ kind: 'hang', ms: 5_000 });
    const failed = rejectionOf(
      client.embeddings.create({ model: MODEL, input: 'x' }, { timeout: 200 }),
    );
    await fake.until((stats) => stats.delayed === 1);
    // The SDK's 200 ms pass in virtual time; the hang's 5 s never do.
    vi.advanceTimersByTime(200);
    expect(await failed).toBeInstanceOf(OpenAI.APIConnectionTimeoutError);
    // The server noticed the client leaving, ended its wait unanswered...
    await fake.until((stats) => stats.delayed === 0 && stats.inFlight === 0);
    expect(fake.stats.replies).toBe(0);
    // ...and is usable again at once.
    vi.useRealTimers();
    await expect(embed('x')).resolves.toBeDefined();
  });

  test('a hang shorter than the SDK timeout still answers normally, once it is over', async () => {
    virtualTimers();
    fake.enqueueFault({ kind: 'hang', ms: 100 });
    const late = embed('late');
    await fake.until((stats) => stats.delayed === 1);
    vi.advanceTimersByTime(99);
    expect(fake.stats).toMatchObject({ delayed: 1, replies: 0 });
    vi.advanceTimersByTime(1);
    const res = await late;
    expect(res.data[0]!.embedding).toEqual(Array.from(fakeEmbedding('late', 1536)));
  });

  test('nan puts a NaN at vector index 0, as real NaN in base64 and as null in float JSON', async () => {
    fake.enqueueFault({ kind: 'nan' }, { kind: 'nan' });
    const b64 = await embed(['p', 'q']);
    expect(Number.isNaN(b64.data[0]!.embedding[0])).toBe(true);
    expect(b64.data[0]!.embedding.slice(1)).toEqual(Array.from(fakeEmbedding('p', 1536)).slice(1));
    expect(b64.data[1]!.embedding).toEqual(Array.from(fakeEmbedding('q', 1536)));
    const flt = await embed(['p'], { encoding_format: 'float' });
    // JSON has no NaN; a JS server writes null there, which clients must reject too.
    expect(flt.data[0]!.embedding[0]).toBeNull();
    expect(fake.stats.inputsEmbedded).toBe(0);
  });

  test('wrong-count returns one embedding fewer than there were inputs', async () => {
    fake.enqueueFault({ kind: 'wrong-count' });
    const res = await embed(['a', 'b', 'c']);
    expect(res.data).toHaveLength(2);
    expect(fake.stats.seen.size).toBe(0);
  });

  test('wrong-dimension gives the vector at index 0 one extra element', async () => {
    fake.enqueueFault({ kind: 'wrong-dimension' });
    const res = await embed(['a', 'b'], { dimensions: 16 });
    expect(res.data[0]!.embedding).toHaveLength(17);
    expect(res.data[1]!.embedding).toHaveLength(16);
  });

  test('queued faults are FIFO and consumed before persistent substring faults', async () => {
    fake.failWhenInputContains('poison', { kind: 'server-error', status: 502 });
    fake.enqueueFault({ kind: 'rate-limit' }, { kind: 'insufficient-quota' });
    const first = (await rejectionOf(embed('poison pill'))) as InstanceType<typeof OpenAI.APIError>;
    expect(first.code).toBe('rate_limit_exceeded');
    const second = (await rejectionOf(embed('clean'))) as InstanceType<typeof OpenAI.APIError>;
    expect(second.code).toBe('insufficient_quota');
    const third = (await rejectionOf(embed(['fine', 'has poison inside']))) as InstanceType<
      typeof OpenAI.APIError
    >;
    expect(third.status).toBe(502);
    await expect(embed(['fine'])).resolves.toBeDefined();
    const again = (await rejectionOf(embed('poison'))) as InstanceType<typeof OpenAI.APIError>;
    expect(again.status).toBe(502);
    fake.reset();
    await expect(embed('poison')).resolves.toBeDefined();
  });
});

describe('request validation', () => {
  test('an unknown model gives 404 model_not_found', async () => {
    const err = await rejectionOf(client.embeddings.create({ model: 'nope', input: 'x' }));
    expect(err).toBeInstanceOf(OpenAI.NotFoundError);
    const nf = err as InstanceType<typeof OpenAI.NotFoundError>;
    expect(nf.code).toBe('model_not_found');
    expect(nf.message).toBe('404 The model `nope` does not exist or you do not have access to it.');
  });

  test('a wrong API key gives 401 invalid_api_key and the right key succeeds', async () => {
    fake.options.apiKey = 'secret';
    const err = await rejectionOf(embed('x'));
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((err as InstanceType<typeof OpenAI.APIError>).code).toBe('invalid_api_key');
    const good = new OpenAI({ baseURL: fake.url, apiKey: 'secret', maxRetries: 0 });
    await expect(good.embeddings.create({ model: MODEL, input: 'x' })).resolves.toBeDefined();
  });

  test('token-array inputs are rejected with 400', async () => {
    const err = await rejectionOf(embed([[1, 2, 3]] as unknown as string[]));
    expect(err).toBeInstanceOf(OpenAI.BadRequestError);
  });

  test('unknown paths get a JSON 404', async () => {
    const res = await fetch(fake.url.replace('/v1', '/v1/nothing-here'));
    expect(res.status).toBe(404);
    expect(res.headers.get('content-type')).toBe('application/json');
    expect(await res.json()).toHaveProperty('error.message');
  });
});

describe('stats', () => {
  test('stats count requests, sizes, tokens and the texts seen in successful responses only', async () => {
    await embed(['a', 'b']);
    await embed(['a']);
    fake.enqueueFault({ kind: 'rate-limit' }, { kind: 'nan' });
    await rejectionOf(embed(['c']));
    await embed(['d', 'e', 'f']);
    expect(fake.stats.requests).toBe(4);
    expect(fake.stats.requestSizes).toEqual([2, 1, 1, 3]);
    expect(fake.stats.inputsEmbedded).toBe(3);
    expect(fake.stats.tokensEmbedded).toBe(countTokens('a') * 2 + countTokens('b'));
    expect(fake.stats.rateLimited).toBe(1);
    expect(Object.fromEntries(fake.stats.seen)).toEqual({ a: 2, b: 1 });

    const seen = fake.stats.seen;
    fake.reset();
    // reset() clears in place, so references held by tests stay live.
    expect(seen.size).toBe(0);
    expect(fake.stats.requests).toBe(0);
    expect(fake.stats.requestSizes).toEqual([]);
  });
});

describe('holds, until and onReply', () => {
  test('a hold keeps the requests it matches unanswered until released; others go on', async () => {
    const hold = fake.hold((inputs) => inputs.includes('slow'));
    const slow = embed(['slow']);
    await fake.until((stats) => stats.held === 1);
    await expect(embed('fast')).resolves.toBeDefined();
    expect(hold.held).toBe(1);
    expect(fake.stats).toMatchObject({ requests: 2, replies: 1, inFlight: 1 });
    hold.release();
    await expect(slow).resolves.toBeDefined();
    expect(fake.stats).toMatchObject({ held: 0, replies: 2, maxInFlight: 2 });
    // Released is released: later matching requests are not held.
    await expect(embed(['slow'])).resolves.toBeDefined();
  });

  test('a client that leaves while held ends its wait; reset() releases every hold', async () => {
    fake.hold();
    const controller = new AbortController();
    const kept = embed('kept');
    const abandoned = rejectionOf(
      client.embeddings.create({ model: MODEL, input: 'abandoned' }, { signal: controller.signal }),
    );
    await fake.until((stats) => stats.held === 2);
    controller.abort();
    await fake.until((stats) => stats.held === 1);
    expect(await abandoned).toBeInstanceOf(OpenAI.APIUserAbortError);
    fake.reset();
    await expect(kept).resolves.toBeDefined();
  });

  test('until() resolves at once when the stats already agree, and its onMet runs at the exact count', async () => {
    await fake.until((stats) => stats.requests === 0);
    const seenAt: number[] = [];
    const third = fake.until(
      (stats) => stats.requests >= 3,
      () => seenAt.push(fake.stats.requests),
    );
    await Promise.all([embed('1'), embed('2'), embed('3'), embed('4')]);
    await third;
    expect(seenAt).toEqual([3]);
  });

  test('until() rejects when the server closes first', async () => {
    const other = await startFakeOpenAI();
    const never = other.until((stats) => stats.requests > 0);
    await other.close();
    await expect(never).rejects.toThrow(/closed/);
    await expect(other.until(() => true)).rejects.toThrow(/closed/);
  });

  test('onReply sees each reply, status and headers, before it is written', async () => {
    const seen: Array<[number, string | undefined]> = [];
    const stop = fake.onReply(({ status, headers }) =>
      seen.push([status, headers['retry-after-ms']]),
    );
    fake.enqueueFault({ kind: 'rate-limit', retryAfterMs: 250 });
    await rejectionOf(embed('x'));
    await embed('y');
    stop();
    await embed('z');
    expect(seen).toEqual([
      [429, '250'],
      [200, undefined],
    ]);
  });
});

describe('the TPM limit', () => {
  test('refills by the clock it is given: a burst, then 429s with the wait, then room again', async () => {
    let now = 0;
    Object.assign(fake.options, { maxTpm: 60_000, maxTpmBurst: 10, clock: { now: () => now } });
    fake.reset(); // a full bucket on the new clock
    // Each 'x' is one token: ten go, the eleventh must wait 1 ms (a token a ms).
    for (let i = 0; i < 10; i++) await embed('x');
    const err = await rejectionOf(embed('x'));
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    expect((err as InstanceType<typeof OpenAI.APIError>).headers?.get('retry-after-ms')).toBe('1');
    expect(fake.stats).toMatchObject({ rateChecked: 11, rateLimited: 1, replies: 11 });
    now += 1;
    await expect(embed('x')).resolves.toBeDefined();
    await expect(rejectionOf(embed('x'))).resolves.toBeInstanceOf(OpenAI.RateLimitError);
    // Never more than the burst, however long the clock stood still.
    now += 60_000;
    for (let i = 0; i < 10; i++) await embed('x');
    await expect(rejectionOf(embed('x'))).resolves.toBeInstanceOf(OpenAI.RateLimitError);
  });
});

describe('close', () => {
  test('close() completes promptly with a keep-alive client and a request still in flight', async () => {
    const other = await startFakeOpenAI();
    const c = new OpenAI({ baseURL: other.url, apiKey: 'test', maxRetries: 0 });
    // Leaves an idle keep-alive socket in undici's pool.
    await c.embeddings.create({ model: MODEL, input: 'warm' });
    other.enqueueFault({ kind: 'hang', ms: 30_000 });
    const inFlight = rejectionOf(c.embeddings.create({ model: MODEL, input: 'stuck' }));
    await other.until((stats) => stats.delayed === 1);

    // In virtual time that never moves: close() cannot be waiting out the
    // hang (or any other timer of ours); it ends the request itself.
    virtualTimers();
    await other.close();
    expect(await inFlight).toBeInstanceOf(OpenAI.APIConnectionError);
    expect(other.stats.replies).toBe(1);
    // Idempotent: a second close does not throw "server is not running".
    await other.close();
  }, 5_000);
});
