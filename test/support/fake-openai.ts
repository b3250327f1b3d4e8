import { createHash, randomUUID } from 'node:crypto';
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { endianness } from 'node:os';
import { countTokens, isWithinTokenLimit } from 'gpt-tokenizer/encoding/cl100k_base';

export type ErrorDialect = 'openai' | 'openai-legacy' | 'vllm' | 'tei' | 'ollama' | 'litellm';

export type Fault =
  | { kind: 'status'; status: number; body?: unknown; headers?: Record<string, string> }
  | {
      kind: 'rate-limit';
      retryAfterMs?: number;
      retryAfterSeconds?: number;
      resetTokens?: string;
    }
  | { kind: 'insufficient-quota' }
  | { kind: 'server-error'; status?: number }
  | { kind: 'drop' }
  | { kind: 'hang'; ms: number }
  | { kind: 'nan' }
  | { kind: 'wrong-count' }
  | { kind: 'wrong-dimension' };

export interface FakeOpenAIOptions {
  /** Port to listen on; default 0 (any free port). */
  port?: number;
  dimensions?: number;
  latencyMs?: number;
  maxInputTokens?: number;
  dialect?: ErrorDialect;
  shuffle?: boolean;
  models?: string[];
  apiKey?: string;
  /**
   * Server-side tokens-per-minute limit, like OpenAI's: a bucket of maxTpm
   * tokens refilled continuously; a request it cannot cover gets a 429 with
   * retry-after-ms and x-ratelimit-*-tokens headers. Default: none.
   */
  maxTpm?: number;
  /** Most tokens the TPM bucket holds (the burst); default maxTpm. */
  maxTpmBurst?: number;
  /**
   * The clock the TPM bucket refills by, in milliseconds; default
   * performance.now(). A test that gives the client's rate gate and this
   * bucket one virtual clock judges the pacing without wall-clock time.
   */
  clock?: { now(): number };
}

export type FakeStats = FakeOpenAI['stats'];

/** What the server is about to send, as onReply listeners see it. */
export interface ReplyInfo {
  status: number;
  headers: Record<string, string>;
}

/** Requests held by hold(), answered only once released. */
export interface Hold {
  /** Lets every request this hold has kept, and every later one, go on. */
  release(): void;
  /** Requests this hold is keeping now. */
  readonly held: number;
}

export interface FakeOpenAI {
  readonly url: string;
  readonly options: FakeOpenAIOptions;
  readonly stats: {
    requests: number;
    inputsEmbedded: number;
    tokensEmbedded: number;
    rateLimited: number;
    seen: Map<string, number>;
    /** `seen`, per model: workers on different models must each send every input once. */
    seenByModel: Map<string, Map<string, number>>;
    requestSizes: number[];
    /** The query string of each embeddings request, as sent ('' for none). */
    queries: string[];
    /** Requests being handled now, and the most at any one time. */
    inFlight: number;
    maxInFlight: number;
    /** Replies sent, of any status (a dropped or abandoned request sends none). */
    replies: number;
    /** Requests that reached the TPM check, whether let through or answered 429. */
    rateChecked: number;
    /** Requests kept by a hold() now. */
    held: number;
    /** Requests in a latencyMs or hang wait now. */
    delayed: number;
  };
  enqueueFault(...faults: Fault[]): void;
  failWhenInputContains(substring: string, fault: Fault): void;
  /**
   * Keeps every embeddings request that arrives from now on (or, with `match`,
   * those whose inputs it accepts) before it is answered, until release(). A
   * held request counts as in flight. Tests use it instead of a latency or a
   * hang that merely makes "still in flight" likely.
   */
  hold(match?: (inputs: string[]) => boolean): Hold;
  /**
   * Resolves once `check(stats)` holds: checked now and after every change to
   * the stats, synchronously. `onMet`, if given, runs at that moment, before
   * the server does anything else (for acting on an exact count, e.g. killing
   * a client at its n-th request). Rejects if the server closes first.
   */
  until(check: (stats: FakeStats) => boolean, onMet?: () => void): Promise<void>;
  /**
   * Calls `listener` for every reply, synchronously, just before it is
   * written. Returns a function that removes the listener.
   */
  onReply(listener: (reply: ReplyInfo) => void): () => void;
  /**
   * Counts the tokens of `texts` now, under the current input limit, so that
   * requests carrying them later only look the counts up. For benchmarks: a
   * real provider tokenizes on its own machines, not on the worker's cores.
   */
  primeTokenCounts(texts: Iterable<string>): void;
  reset(): void;
  close(): Promise<void>;
}

const DEFAULT_MODELS = [
  'text-embedding-3-small',
  'text-embedding-3-large',
  'text-embedding-ada-002',
];

// The real API tokenises special-token lookalikes (e.g. "<|endoftext|>") as plain text;
// gpt-tokenizer would throw on them by default.
const PLAIN_TEXT = { disallowedSpecial: new Set<string>() };

/** sfc32 PRNG: four 32-bit words of state, so the whole sha256 prefix feeds the seed. */
function sfc32(a: number, b: number, c: number, d: number): () => number {
  return () => {
    a |= 0;
    b |= 0;
    c |= 0;
    d |= 0;
    const t = (((a + b) | 0) + d) | 0;
    d = (d + 1) | 0;
    a = b ^ (b >>> 9);
    b = (c + (c << 3)) | 0;
    c = (c << 21) | (c >>> 11);
    c = (c + t) | 0;
    return (t >>> 0) / 4294967296;
  };
}

/**
 * The deterministic vector the server returns for `text`. The PRNG stream does not depend on
 * `dimensions`, so a shorter vector is the renormalised prefix of a longer one (like OpenAI's
 * `dimensions` parameter).
 */
export function fakeEmbedding(text: string, dimensions: number): Float32Array {
  const h = createHash('sha256').update(text, 'utf8').digest();
  const next = sfc32(h.readUInt32LE(0), h.readUInt32LE(4), h.readUInt32LE(8), h.readUInt32LE(12));
  // Warm up so that similar seeds diverge before we sample.
  for (let i = 0; i < 12; i++) next();
  const raw = new Float64Array(dimensions);
  let sumSq = 0;
  for (let i = 0; i < dimensions; i++) {
    const v = next() * 2 - 1;
    raw[i] = v;
    sumSq += v * v;
  }
  const norm = Math.sqrt(sumSq) || 1;
  const out = new Float32Array(dimensions);
  for (let i = 0; i < dimensions; i++) out[i] = raw[i]! / norm;
  return out;
}

const LITTLE_ENDIAN_HOST = endianness() === 'LE';

function toBase64(vec: Float32Array): string {
  if (LITTLE_ENDIAN_HOST)
    return Buffer.from(vec.buffer, vec.byteOffset, vec.byteLength).toString('base64');
  // Explicit little-endian so the wire format does not depend on host byte order.
  const buf = Buffer.alloc(vec.length * 4);
  for (let i = 0; i < vec.length; i++) buf.writeFloatLE(vec[i]!, i * 4);
  return buf.toString('base64');
}

interface Reply {
  status: number;
  body: unknown;
  headers?: Record<string, string>;
}

function openaiError(
  status: number,
  message: string,
  type: string | null,
  code: string | null,
  param: string | null = null,
): Reply {
  return { status, body: { error: { message, type, param, code } } };
}

function contextLengthError(
  dialect: ErrorDialect,
  index: number,
  tokens: number,
  limit: number,
): Reply {
  switch (dialect) {
    case 'openai':
      return openaiError(
        400,
        `Invalid 'input[${index}]': maximum input length is ${limit} tokens.`,
        'invalid_request_error',
        null,
        'input',
      );
    case 'openai-legacy':
      return openaiError(
        400,
        `This model's maximum context length is ${limit} tokens, however you requested ${tokens} tokens (${tokens} in your prompt; 0 for the completion). Please reduce your prompt; or completion length.`,
        'invalid_request_error',
        null,
      );
    case 'vllm':
      return {
        status: 400,
        body: {
          object: 'error',
          message: `This model's maximum context length is ${limit} tokens. However, you requested ${tokens} tokens in the messages, Please reduce the length of the messages.`,
          type: 'BadRequestError',
          param: null,
          code: 400,
        },
      };
    case 'tei':
      return {
        status: 413,
        body: {
          error: `Input validation error: \`inputs\` must have less than ${limit} tokens. Given: ${tokens}`,
          error_type: 'Validation',
        },
      };
    case 'ollama':
      return { status: 400, body: { error: 'the input length exceeds the context length' } };
    case 'litellm':
      return openaiError(
        400,
        `litellm.ContextWindowExceededError: litellm.BadRequestError: ContextWindowExceededError: OpenAIException - This model's maximum context length is ${limit} tokens. However, your messages resulted in ${tokens} tokens.`,
        null,
        '400',
      );
  }
}

/** Replies for faults that never produce embeddings; null for faults that alter a success. */
function faultReply(fault: Fault, model: string): Reply | null {
  switch (fault.kind) {
    case 'status':
      return {
        status: fault.status,
        body: fault.body ?? {
          error: {
            message: `Injected fault with status ${fault.status}`,
            type: 'fake_fault',
            param: null,
            code: null,
          },
        },
        ...(fault.headers ? { headers: fault.headers } : {}),
      };
    case 'rate-limit': {
      const headers: Record<string, string> = {};
      if (fault.retryAfterMs !== undefined) headers['retry-after-ms'] = String(fault.retryAfterMs);
      if (fault.retryAfterSeconds !== undefined) {
        headers['retry-after'] = String(fault.retryAfterSeconds);
      }
      if (fault.resetTokens !== undefined) headers['x-ratelimit-reset-tokens'] = fault.resetTokens;
      return {
        ...openaiError(
          429,
          `Rate limit reached for ${model} in organization org-fake on requests per min (RPM): Limit 3000, Used 3000, Requested 1. Please try again in ${fault.retryAfterMs ?? (fault.retryAfterSeconds ?? 1) * 1000}ms. Visit https://platform.openai.com/account/rate-limits to learn more.`,
          'requests',
          'rate_limit_exceeded',
        ),
        headers,
      };
    }
    case 'insufficient-quota':
      return openaiError(
        429,
        'You exceeded your current quota, please check your plan and billing details. For more information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.',
        'insufficient_quota',
        'insufficient_quota',
      );
    case 'server-error':
      return openaiError(
        fault.status ?? 500,
        'The server had an error while processing your request. Sorry about that!',
        'server_error',
        null,
      );
    default:
      return null;
  }
}

/**
 * The server's TPM limit, like OpenAI's: `size` tokens, refilled continuously
 * at `perMinute`, starting full. Written here rather than shared with the
 * client's rate gate, so that the test server judges the gate independently.
 */
class TpmBucket {
  content: number;
  #lastDrip: number;
  readonly #perMs: number;

  constructor(
    readonly perMinute: number,
    readonly size: number,
    readonly clock: { now(): number },
  ) {
    this.#perMs = perMinute / 60_000;
    this.content = size;
    this.#lastDrip = clock.now();
  }

  tryRemove(count: number): boolean {
    this.#drip();
    if (count > this.content) return false;
    this.content -= count;
    return true;
  }

  /** Milliseconds until `count` tokens are in the bucket. */
  waitTime(count: number): number {
    this.#drip();
    return count > this.content ? Math.ceil((count - this.content) / this.#perMs) : 0;
  }

  #drip(): void {
    const now = this.clock.now();
    this.content = Math.min(
      this.size,
      this.content + Math.max(now - this.#lastDrip, 0) * this.#perMs,
    );
    this.#lastDrip = now;
  }
}

const SYSTEM_CLOCK = { now: () => performance.now() };

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

/** Returns the inputs as strings, or an error message for anything we do not accept. */
function parseInput(input: unknown): string[] | string {
  if (typeof input === 'string') return [input];
  if (!Array.isArray(input)) return "'input' must be a string or an array of strings";
  if (input.length === 0) return "'input' must not be empty";
  if (!input.every((x): x is string => typeof x === 'string')) {
    return 'This fake server only supports string inputs, not token arrays';
  }
  return input;
}

export async function startFakeOpenAI(options: FakeOpenAIOptions = {}): Promise<FakeOpenAI> {
  const opts: FakeOpenAIOptions = {
    dimensions: 1536,
    latencyMs: 0,
    maxInputTokens: 8192,
    dialect: 'openai',
    shuffle: false,
    models: [...DEFAULT_MODELS],
    ...options,
  };
  const stats: FakeOpenAI['stats'] = {
    requests: 0,
    inputsEmbedded: 0,
    tokensEmbedded: 0,
    rateLimited: 0,
    seen: new Map(),
    seenByModel: new Map(),
    requestSizes: [],
    queries: [],
    inFlight: 0,
    maxInFlight: 0,
    replies: 0,
    rateChecked: 0,
    held: 0,
    delayed: 0,
  };

  // until(): conditions on the stats, rechecked synchronously after every change.
  const waiters = new Set<{
    check: (s: FakeStats) => boolean;
    met: () => void;
    closed: () => void;
  }>();
  const changed = (): void => {
    for (const waiter of [...waiters]) {
      if (waiters.has(waiter) && waiter.check(stats)) {
        waiters.delete(waiter);
        waiter.met();
      }
    }
  };
  const replyListeners = new Set<(reply: ReplyInfo) => void>();

  // hold(): each active hold keeps the requests it matches until released.
  interface ActiveHold {
    match: ((inputs: string[]) => boolean) | undefined;
    waiting: Set<() => void>;
    released: boolean;
  }
  const holds = new Set<ActiveHold>();
  const releaseHold = (hold: ActiveHold): void => {
    if (hold.released) return;
    hold.released = true;
    holds.delete(hold);
    for (const go of [...hold.waiting]) go();
  };

  let tpmBucket: TpmBucket | undefined;
  const rateLimit = (tokens: number): Reply | undefined => {
    const maxTpm = opts.maxTpm;
    if (!maxTpm) return undefined;
    const burst = opts.maxTpmBurst ?? maxTpm;
    const clock = opts.clock ?? SYSTEM_CLOCK;
    if (tpmBucket?.perMinute !== maxTpm || tpmBucket.size !== burst || tpmBucket.clock !== clock) {
      tpmBucket = new TpmBucket(maxTpm, burst, clock);
    }
    const cost = Math.min(tokens, burst);
    if (cost === 0) return undefined;
    if (tpmBucket.tryRemove(cost)) return undefined;
    const waitMs = tpmBucket.waitTime(cost);
    return {
      status: 429,
      body: {
        error: {
          message: `Rate limit reached for tokens per min (TPM): Limit ${maxTpm}, Requested ${tokens}. Please try again in ${waitMs}ms.`,
          type: 'tokens',
          param: null,
          code: 'rate_limit_exceeded',
        },
      },
      headers: {
        'retry-after-ms': String(waitMs),
        'x-ratelimit-limit-tokens': String(maxTpm),
        'x-ratelimit-remaining-tokens': String(Math.floor(tpmBucket.content)),
        'x-ratelimit-reset-tokens': `${waitMs}ms`,
      },
    };
  };
  const queued: Fault[] = [];
  const persistent: { substring: string; fault: Fault }[] = [];
  const sockets = new Set<Socket>();
  // Aborted by close() so pending latency/hang timers do not keep the process alive.
  const closing = new AbortController();

  // The provider's CPU is not the worker's: in a benchmark this server shares
  // the worker's two cores. So a text's tokens are counted once per limit,
  // and primeTokenCounts can count them before anything is timed.
  const tokenCache = new Map<string, number | false>();
  let tokenCacheLimit = 0;
  const tokensWithin = (text: string, limit: number): number | false => {
    if (limit !== tokenCacheLimit) {
      tokenCache.clear();
      tokenCacheLimit = limit;
    }
    let n = tokenCache.get(text);
    if (n === undefined) {
      // isWithinTokenLimit stops early, so a 1 MB input does not cost a full tokenisation.
      n = isWithinTokenLimit(text, limit, PLAIN_TEXT);
      if (tokenCache.size >= 100_000) tokenCache.clear();
      tokenCache.set(text, n);
    }
    return n;
  };

  const send = (res: ServerResponse, reply: Reply): void => {
    if (res.destroyed || res.writableEnded) return;
    if (reply.status === 429) stats.rateLimited++;
    stats.replies++;
    for (const listener of [...replyListeners]) {
      listener({ status: reply.status, headers: { ...reply.headers } });
    }
    // No content-length: chunked, as many real servers send. Counting a
    // 525 KB body's UTF-8 bytes took 1.8 ms a reply here, the server's
    // largest cost after the socket write.
    const payload = JSON.stringify(reply.body);
    res.writeHead(reply.status, {
      'content-type': 'application/json',
      'x-request-id': `req_${randomUUID().replaceAll('-', '')}`,
      ...reply.headers,
    });
    res.end(payload);
    changed();
  };

  /** Waits for `hold` to be released; false if the client left or the server closed first. */
  const held = (hold: ActiveHold, signal: AbortSignal): Promise<boolean> => {
    if (hold.released) return Promise.resolve(true);
    if (signal.aborted) return Promise.resolve(false);
    return new Promise<boolean>((resolve) => {
      const done = (ok: boolean) => {
        hold.waiting.delete(go);
        signal.removeEventListener('abort', gone);
        stats.held--;
        changed();
        resolve(ok);
      };
      const go = () => done(true);
      const gone = () => done(false);
      hold.waiting.add(go);
      signal.addEventListener('abort', gone, { once: true });
      stats.held++;
      changed();
    });
  };

  const pickFault = (inputs: string[] | null): Fault | undefined => {
    const next = queued.shift();
    if (next) return next;
    if (!inputs) return undefined;
    return persistent.find((p) => inputs.some((s) => s.includes(p.substring)))?.fault;
  };

  const handleEmbeddings = async (req: IncomingMessage, res: ServerResponse): Promise<void> => {
    const raw = await readBody(req);
    let body: Record<string, unknown> | null = null;
    try {
      const parsed: unknown = JSON.parse(raw);
      if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) {
        body = parsed as Record<string, unknown>;
      }
    } catch {
      body = null;
    }
    const parsedInput = body ? parseInput(body.input) : null;
    const inputs = Array.isArray(parsedInput) ? parsedInput : null;

    // Everything that depends on arrival order happens before the first await.
    stats.requests++;
    stats.requestSizes.push(inputs?.length ?? 0);
    const holding = [...holds].find((h) => !h.match || (inputs !== null && h.match(inputs)));
    changed();

    if (opts.apiKey !== undefined && req.headers.authorization !== `Bearer ${opts.apiKey}`) {
      return send(
        res,
        openaiError(
          401,
          'Incorrect API key provided: sk-****. You can find your API key at https://platform.openai.com/account/api-keys.',
          'invalid_request_error',
          'invalid_api_key',
        ),
      );
    }
    const fault = pickFault(inputs);

    // Lets a client that gave up (timeout) cancel our timers instead of leaving them running.
    const gone = new AbortController();
    res.on('close', () => gone.abort());
    const wait = (ms: number): Promise<boolean> => {
      if (ms <= 0) return Promise.resolve(true);
      const signal = AbortSignal.any([closing.signal, gone.signal]);
      if (signal.aborted) return Promise.resolve(false);
      return new Promise<boolean>((resolve) => {
        const done = (ok: boolean) => {
          clearTimeout(timer);
          signal.removeEventListener('abort', stop);
          stats.delayed--;
          changed();
          resolve(ok);
        };
        const stop = () => done(false);
        // The global setTimeout, looked up at each call: vitest's fake timers
        // can drive latencyMs and hangs in virtual time.
        const timer = setTimeout(() => done(true), ms);
        signal.addEventListener('abort', stop, { once: true });
        stats.delayed++;
        changed();
      });
    };

    if (holding && !(await held(holding, AbortSignal.any([closing.signal, gone.signal])))) return;
    if (!(await wait(opts.latencyMs ?? 0))) return;
    if (fault?.kind === 'drop') {
      req.socket.destroy();
      return;
    }
    if (fault?.kind === 'hang' && !(await wait(fault.ms))) return;

    const model = typeof body?.model === 'string' ? body.model : '';
    if (fault) {
      const reply = faultReply(fault, model || 'text-embedding-3-small');
      if (reply) return send(res, reply);
    }

    if (!body) {
      return send(
        res,
        openaiError(
          400,
          'We could not parse the JSON body of your request.',
          'invalid_request_error',
          null,
        ),
      );
    }
    if (!inputs) {
      return send(
        res,
        openaiError(400, String(parsedInput), 'invalid_request_error', null, 'input'),
      );
    }
    if (!model) {
      return send(
        res,
        openaiError(
          400,
          'You must provide a model parameter.',
          'invalid_request_error',
          null,
          'model',
        ),
      );
    }
    if (!(opts.models ?? DEFAULT_MODELS).includes(model)) {
      return send(
        res,
        openaiError(
          404,
          `The model \`${model}\` does not exist or you do not have access to it.`,
          'invalid_request_error',
          'model_not_found',
        ),
      );
    }
    const dims = body.dimensions ?? opts.dimensions ?? 1536;
    if (typeof dims !== 'number' || !Number.isInteger(dims) || dims < 1) {
      return send(
        res,
        openaiError(
          400,
          "'dimensions' must be a positive integer",
          'invalid_request_error',
          null,
          'dimensions',
        ),
      );
    }
    const encoding = body.encoding_format ?? 'float';
    if (encoding !== 'float' && encoding !== 'base64') {
      return send(
        res,
        openaiError(
          400,
          `'${String(encoding)}' is not one of ['float', 'base64'] - 'encoding_format'`,
          'invalid_request_error',
          null,
          'encoding_format',
        ),
      );
    }

    const limit = opts.maxInputTokens ?? 8192;
    const tokenCounts: number[] = [];
    for (const [i, text] of inputs.entries()) {
      const n = tokensWithin(text, limit);
      if (n === false) {
        const over = countTokens(text, PLAIN_TEXT);
        return send(res, contextLengthError(opts.dialect ?? 'openai', i, over, limit));
      }
      tokenCounts.push(n);
    }
    const promptTokens = tokenCounts.reduce((a, b) => a + b, 0);
    stats.rateChecked++;
    const limited = rateLimit(promptTokens);
    if (limited) return send(res, limited);
    changed();

    const vectors = inputs.map((text) => fakeEmbedding(text, dims));
    let data: { object: 'embedding'; index: number; embedding: number[] | string }[] = vectors.map(
      (vec, index) => {
        let v = vec;
        if (index === 0 && fault?.kind === 'nan') v[0] = Number.NaN;
        if (index === 0 && fault?.kind === 'wrong-dimension') {
          v = new Float32Array(vec.length + 1);
          v.set(vec);
          v[vec.length] = 0.5;
        }
        // Array.from on a Float32Array yields the exact float32 values as JS numbers;
        // NaN becomes null in JSON, the only thing a JSON parser will accept there.
        const embedding = encoding === 'base64' ? toBase64(v) : Array.from(v);
        return { object: 'embedding', index, embedding };
      },
    );
    if (fault?.kind === 'wrong-count') data = data.slice(0, -1);
    if (opts.shuffle && data.length > 1) data = data.reverse();

    // Faulted 200s are not "successful": a correct client rejects them, so they must not count.
    if (!fault) {
      stats.inputsEmbedded += inputs.length;
      stats.tokensEmbedded += promptTokens;
      for (const text of inputs) stats.seen.set(text, (stats.seen.get(text) ?? 0) + 1);
      const perModel = stats.seenByModel.get(model) ?? new Map<string, number>();
      stats.seenByModel.set(model, perModel);
      for (const text of inputs) perModel.set(text, (perModel.get(text) ?? 0) + 1);
    }
    return send(res, {
      status: 200,
      body: {
        object: 'list',
        data,
        model,
        usage: { prompt_tokens: promptTokens, total_tokens: promptTokens },
      },
    });
  };

  const server = createServer((req, res) => {
    const path = (req.url ?? '/').split('?')[0];
    if (req.method === 'POST' && (path === '/v1/embeddings' || path === '/embeddings')) {
      stats.queries.push((req.url ?? '').slice(path.length));
      stats.inFlight++;
      stats.maxInFlight = Math.max(stats.maxInFlight, stats.inFlight);
      res.once('close', () => {
        stats.inFlight--;
        changed();
      });
      handleEmbeddings(req, res).catch((err: unknown) => {
        send(
          res,
          openaiError(
            500,
            `Fake server bug: ${err instanceof Error ? err.message : String(err)}`,
            'server_error',
            null,
          ),
        );
      });
      return;
    }
    // Drain the body so the keep-alive connection stays usable.
    req.resume();
    send(
      res,
      openaiError(
        404,
        `Invalid URL (${req.method ?? 'GET'} ${req.url ?? '/'})`,
        'invalid_request_error',
        null,
      ),
    );
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(options.port ?? 0, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  let closed: Promise<void> | undefined;
  return {
    url: `http://127.0.0.1:${port}/v1`,
    options: opts,
    stats,
    enqueueFault(...faults) {
      queued.push(...faults);
    },
    failWhenInputContains(substring, fault) {
      persistent.push({ substring, fault });
    },
    primeTokenCounts(texts) {
      for (const text of texts) tokensWithin(text, opts.maxInputTokens ?? 8192);
    },
    hold(match) {
      const hold: ActiveHold = { match, waiting: new Set(), released: false };
      holds.add(hold);
      return {
        release: () => releaseHold(hold),
        get held() {
          return hold.waiting.size;
        },
      };
    },
    until(check, onMet) {
      return new Promise<void>((resolve, reject) => {
        if (closing.signal.aborted) return reject(new Error('the fake server is closed'));
        const met = () => {
          onMet?.();
          resolve();
        };
        if (check(stats)) return met();
        waiters.add({
          check,
          met,
          closed: () => reject(new Error('the fake server closed first')),
        });
      });
    },
    onReply(listener) {
      replyListeners.add(listener);
      return () => replyListeners.delete(listener);
    },
    reset() {
      // Held requests go on: a hold must not outlive the test that made it.
      for (const hold of [...holds]) releaseHold(hold);
      stats.requests = 0;
      stats.inputsEmbedded = 0;
      stats.tokensEmbedded = 0;
      stats.rateLimited = 0;
      stats.seen.clear();
      stats.seenByModel.clear();
      stats.requestSizes.length = 0;
      stats.queries.length = 0;
      stats.maxInFlight = stats.inFlight;
      stats.replies = 0;
      stats.rateChecked = 0;
      replyListeners.clear();
      // A full bucket from now on, not from the next request: a client that
      // starts pacing after this must find the server at least as generous.
      tpmBucket = undefined;
      rateLimit(0);
      queued.length = 0;
      persistent.length = 0;
    },
    close() {
      closed ??= new Promise<void>((resolve, reject) => {
        closing.abort();
        for (const waiter of waiters) waiter.closed();
        waiters.clear();
        server.close((err) => (err ? reject(err) : resolve()));
        // server.close() alone waits for idle keep-alive sockets to time out.
        for (const socket of sockets) socket.destroy();
      });
      return closed;
    },
  };
}
