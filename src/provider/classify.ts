import OpenAI from 'openai';
import {
  InputRejectedError,
  type PgembedError,
  ProviderFatalError,
  ProviderTransientError,
} from '../errors.js';
import { redactSecrets, redactUrl } from '../redact.js';

/**
 * What we know of the request, to make fatal errors say what to fix. The base
 * URL may carry secrets (user-info, an `?api-key=`): messages show it only
 * through redactUrl.
 */
export interface RequestContext {
  model: string;
  baseURL: string;
}

/**
 * Context-length errors in every shape we know. Servers differ, so each
 * pattern names where it comes from; `index` and `limit` are captured when the
 * text carries them.
 */
const CONTEXT_LENGTH_PATTERNS: Array<{ source: string; pattern: RegExp }> = [
  // OpenAI now: "Invalid 'input[3]': maximum input length is 8192 tokens."
  {
    source: 'openai',
    pattern: /input\[(?<index>\d+)\]'?: maximum input length is (?<limit>\d+) tokens/i,
  },
  // OpenAI before, vLLM, LiteLLM: "This model's maximum context length is 8192 tokens, however you requested …"
  {
    source: 'openai-legacy/vllm/litellm',
    pattern: /maximum context length is (?<limit>\d+) tokens/i,
  },
  { source: 'litellm', pattern: /ContextWindowExceededError/ },
  // Hugging Face TEI (413): "Input validation error: `inputs` must have less than 512 tokens. Given: 600"
  { source: 'tei', pattern: /Input validation error:.*less than (?<limit>\d+) tokens/i },
  // Ollama: "the input length exceeds the context length"
  { source: 'ollama', pattern: /input length exceeds the (?:maximum )?context length/i },
];

/** Every string in the error body and message; non-OpenAI bodies live in `body` (see client.ts). */
export function errorText(error: InstanceType<typeof OpenAI.APIError>): string {
  const parts: string[] = [error.message];
  const visit = (value: unknown, depth: number) => {
    if (depth > 3 || value == null) return;
    if (typeof value === 'string') parts.push(value);
    else if (typeof value === 'object') for (const v of Object.values(value)) visit(v, depth + 1);
  };
  visit(error.error, 0);
  visit((error as { body?: unknown }).body, 0);
  return parts.join(' | ');
}

function contextLengthMatch(text: string): { index?: number; limit?: number } | undefined {
  for (const { pattern } of CONTEXT_LENGTH_PATTERNS) {
    const groups = pattern.exec(text)?.groups;
    if (groups === undefined && !pattern.test(text)) continue;
    return {
      ...(groups?.index !== undefined ? { index: Number(groups.index) } : {}),
      ...(groups?.limit !== undefined ? { limit: Number(groups.limit) } : {}),
    };
  }
  return undefined;
}

export function classifyProviderError(error: unknown, request: RequestContext): unknown {
  if (error instanceof OpenAI.APIUserAbortError) return error;
  if (error instanceof OpenAI.APIConnectionTimeoutError) {
    return new ProviderTransientError('request timed out', undefined, undefined, { cause: error });
  }
  if (error instanceof OpenAI.APIConnectionError) {
    // fetch quotes the whole URL, user-info and all ("Request cannot be
    // constructed from a URL that includes credentials: …").
    const cause = error.cause instanceof Error ? `: ${redactSecrets(error.cause.message)}` : '';
    return new ProviderTransientError(`connection error${cause}`, undefined, undefined, {
      cause: error,
    });
  }
  if (!(error instanceof OpenAI.APIError) || error.status === undefined) return error;
  return classifyStatus(error, error.status, request);
}

function classifyStatus(
  error: InstanceType<typeof OpenAI.APIError>,
  status: number,
  request: RequestContext,
): PgembedError {
  const text = errorText(error);
  // Servers echo the request (a proxy's 404 quotes the path and its query).
  const snippet = redactSecrets(text.replace(/\s+/g, ' ')).slice(0, 300);
  const baseURL = redactUrl(request.baseURL);
  const options = { cause: error };

  // Only a client error can be about an input; a 5xx or 429 quoting the same
  // words is still the server's problem.
  const contextLength =
    status >= 400 && status < 500 && status !== 429 ? contextLengthMatch(text) : undefined;
  if (contextLength) {
    return new InputRejectedError(
      `input over the model's context length (HTTP ${status}: ${snippet})`,
      'context_length',
      contextLength.index,
      contextLength.limit,
      status,
      options,
    );
  }

  const code = `${error.code ?? ''} ${error.type ?? ''}`;
  if (status === 429 && /insufficient_quota/.test(`${code} ${text}`)) {
    return new ProviderFatalError(
      `the provider says the quota is used up (429 insufficient_quota): add credit or raise the account's limit; retrying will not help`,
      status,
      options,
    );
  }
  if (status === 401) {
    return new ProviderFatalError(
      `the provider rejected the API key (401): set OPENAI_API_KEY to a valid key for ${baseURL}`,
      status,
      options,
    );
  }
  if (status === 403) {
    return new ProviderFatalError(
      `permission denied (403) for model '${request.model}': the key's project or region lacks access (${snippet})`,
      status,
      options,
    );
  }
  if (status === 404) {
    return new ProviderFatalError(
      `model '${request.model}' not found at ${baseURL} (404): check --model / PGEMBED_MODEL and OPENAI_BASE_URL`,
      status,
      options,
    );
  }
  if (status === 429 || status === 408 || status === 409 || status >= 500) {
    return new ProviderTransientError(
      `HTTP ${status}: ${snippet}`,
      status,
      retryAfterMs(error.headers),
      options,
    );
  }
  // A 400 about a request parameter (dimensions on a model without them, an
  // unknown model behind a proxy) would fail every input alike: stop now.
  if (error.param && /^(model|dimensions|encoding_format|user)$/.test(error.param)) {
    return new ProviderFatalError(
      `the provider refused the request's '${error.param}' (HTTP ${status}: ${snippet}): check --model / --dimensions`,
      status,
      options,
    );
  }
  // Any other 4xx: maybe one input, maybe the request. The worker isolates it;
  // if every input fails alone, it is the request and the run stops.
  const index = /input\[(\d+)\]/.exec(text)?.[1];
  return new InputRejectedError(
    `HTTP ${status}: ${snippet}`,
    'rejected_input',
    index === undefined ? undefined : Number(index),
    undefined,
    status,
    options,
  );
}

/**
 * The server's requested wait: retry-after-ms, then retry-after (seconds or an
 * HTTP date), then OpenAI's x-ratelimit-reset-* ("1s", "6m0s", "20ms").
 */
export function retryAfterMs(headers: Headers | undefined): number | undefined {
  if (!headers) return undefined;
  const ms = Number(headers.get('retry-after-ms'));
  if (headers.get('retry-after-ms') && Number.isFinite(ms) && ms >= 0) return ms;
  const after = headers.get('retry-after');
  if (after) {
    const seconds = Number(after);
    if (Number.isFinite(seconds) && seconds >= 0) return seconds * 1000;
    const date = Date.parse(after);
    if (!Number.isNaN(date)) return Math.max(0, date - Date.now());
  }
  // OpenAI sends both resets on every 429; wait for the budget that ran out
  // (remaining 0), not the longer one, else the shorter of the two.
  const limits = (['requests', 'tokens'] as const).map((kind) => ({
    resetMs: parseDuration(headers.get(`x-ratelimit-reset-${kind}`)),
    exhausted: headers.get(`x-ratelimit-remaining-${kind}`) === '0',
  }));
  const known = limits.filter((l) => l.resetMs !== undefined);
  const exhausted = known.filter((l) => l.exhausted);
  const pick = exhausted.length ? exhausted : known;
  return pick.length ? Math.min(...pick.map((l) => l.resetMs as number)) : undefined;
}

function parseDuration(value: string | null): number | undefined {
  if (!value) return undefined;
  const units: Record<string, number> = { h: 3_600_000, m: 60_000, s: 1000, ms: 1 };
  let total = 0;
  let matched = false;
  for (const m of value.matchAll(/(\d+(?:\.\d+)?)(ms|h|m|s)/g)) {
    total += Number(m[1]) * (units[m[2] as string] ?? 0);
    matched = true;
  }
  return matched ? total : undefined;
}
