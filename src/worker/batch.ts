import {
  InputRejectedError,
  InterruptedError,
  InvalidResponseError,
  ProviderFatalError,
  RetriesExhaustedError,
  type SkipReason,
  TokenCountError,
} from '../errors.js';
import { tokenCount } from '../provider/cl100k.js';
import type { EmbeddingProvider } from '../provider/client.js';
import { type RetryPolicy, withRetries } from '../provider/retry.js';
import { countTokens, countTokensWithin, truncateWithin } from '../provider/tokens.js';
import type { EligibleMessage } from '../sql/messages.js';

export interface BatchSettings {
  provider: EmbeddingProvider;
  retry: RetryPolicy;
  /** Checked before sending; undefined: the provider's answer decides. */
  maxInputTokens: number | undefined;
  truncate: boolean;
  /**
   * Count every input's tokens before sending: for --max-tpm, whose gate
   * admits requests by their exact size, and for --dry-run. Otherwise only
   * inputs that could be over the limit are counted (see prepareBatch).
   */
  countAll: boolean;
  /** Per-request caps (OpenAI: 2,048 inputs, 300,000 tokens); a batch over them goes in parts. */
  maxRequestInputs: number;
  maxRequestTokens: number;
  /** Awaited before every HTTP attempt with its token count: the rate gate. */
  beforeAttempt?: (tokens: number) => Promise<void>;
  /** Told of each request that succeeded, for adaptive concurrency. */
  onSent?: () => void;
  /**
   * Told of each request the provider answered (HTTP 200), the moment the
   * answer arrives and whether or not it is kept: what the provider bills.
   * `tokens` is the provider's `usage.prompt_tokens` when it reports it, else
   * our count of what was sent.
   */
  onAnswered?: (billed: { tokens: number }) => void;
}

/**
 * What the run knows while one batch is being sent; asked at every request,
 * so a batch in flight learns at once that the run is stopping.
 */
export interface SendControl {
  /**
   * Of these inputs, those the run would still keep an answer for. Asked
   * before each HTTP attempt (each part of a split batch, each retry), after
   * any wait for the rate gate: an input it leaves out is not sent, and is
   * reported in `BatchOutcome.unsent`.
   */
  sendable(inputs: Input[]): Input[];
  /** An input the provider's answer showed cannot be embedded, as soon as that is known. */
  onFailure?(failure: Failure): void;
}

/** A page with its tokens counted: what is to be sent, and what is known to fail already. */
export interface PreparedBatch {
  messages: EligibleMessage[];
  toSend: Input[];
  /** Inputs over the limit, found before any API call. */
  failed: Failure[];
}

export interface Input {
  /** Position in the page, so results keep id order whatever isolation did. */
  position: number;
  message: EligibleMessage;
  text: string;
  /** Its exact cl100k count, when counted before sending (see prepareBatch). */
  tokens: number | undefined;
  /** UTF-8 bytes of `text`: at least its cl100k token count, since every token is one byte or more. */
  bytes: number;
  truncated: boolean;
}

export interface Embedded {
  position: number;
  message: EligibleMessage;
  vector: Float32Array;
  /**
   * Exact when counted; otherwise its share, by UTF-8 length, of the tokens
   * the provider reported for the request (so a request's inputs add up to
   * what it billed); counted after the answer when it reported none.
   */
  tokens: number;
  truncated: boolean;
}

export interface Failure {
  position: number;
  message: EligibleMessage;
  reason: SkipReason;
  /** One line for embedding_skips.detail and the strict-mode error. */
  detail: string;
  /** Its cl100k count; undefined for one found over the limit, counted no further. */
  tokens: number | undefined;
  /** The limit in force, when one is known. */
  limitTokens: number | undefined;
  /** HTTP status when the provider refused it. */
  status: number | undefined;
}

export interface BatchOutcome {
  embedded: Embedded[];
  failed: Failure[];
  /**
   * Inputs never sent because the run was stopping (SendControl.sendable
   * left them out, or a stop signal cut a retry's wait), in position order.
   */
  unsent: Input[];
  /** HTTP requests made, retries included. */
  attempts: number;
  /** Requests that were not retries: 1, or more when a batch was split. */
  sends: number;
}

/** A request the run decided, right before sending it, not to send. */
class NotSentError extends Error {
  constructor() {
    super('not sent: the run is stopping');
    this.name = 'NotSentError';
  }
}

/**
 * Embeds one page of messages. Inputs known to be too long never reach the
 * API. A request that fails because of one input is narrowed down to that
 * input (by the index the server names, else by halving), so its batch-mates
 * are embedded and only the culprit is reported.
 */
export async function prepareBatch(
  messages: EligibleMessage[],
  settings: Pick<BatchSettings, 'maxInputTokens' | 'truncate' | 'countAll'>,
): Promise<PreparedBatch> {
  const prepared: PreparedBatch = { messages, toSend: [], failed: [] };
  const limit = settings.maxInputTokens;
  const inputs: Input[] = messages.map((message, position) => {
    const text = message.content;
    return {
      position,
      message,
      text,
      tokens: undefined,
      bytes: Buffer.byteLength(text, 'utf8'),
      truncated: false,
    };
  });
  // A text within the limit in bytes is within it in tokens: counting it
  // could not change the answer. Counting was half of a worker's busy time
  // on the email corpus (10.7 of 21 s, BENCHMARKS.md), where most emails
  // are under 8,192 bytes. The rest are counted only up to the limit.
  const toCount = inputs.filter(
    (i) => settings.countAll || (limit !== undefined && i.bytes > limit),
  );
  const texts = toCount.map((i) => i.text);
  const counts =
    limit === undefined ? await countTokens(texts) : await countTokensWithin(texts, limit);
  const over = new Set<Input>();
  toCount.forEach((input, k) => {
    input.tokens = counts[k];
    if (input.tokens === undefined) over.add(input);
  });
  for (const input of inputs) {
    if (limit === undefined || !over.has(input)) {
      prepared.toSend.push(input);
    } else if (settings.truncate) {
      prepared.toSend.push(await truncated(input, limit));
    } else {
      prepared.failed.push(overLimit(input, limit, undefined));
    }
  }
  return prepared;
}

/** An input found over the limit before sending; `tokens`: its full count, if made. */
function overLimit(
  input: Pick<Input, 'position' | 'message'>,
  limit: number,
  tokens: number | undefined,
): Failure {
  const size =
    tokens === undefined
      ? `over the ${limit}-token limit (counted up to it before sending; no API call made)`
      : `${tokens} tokens, over the ${limit}-token limit (counted before sending; no API call made)`;
  return {
    position: input.position,
    message: input.message,
    reason: 'context_length',
    detail: size,
    tokens,
    limitTokens: limit,
    status: undefined,
  };
}

/**
 * Strict mode: nothing after the first input known to fail is sent, since the
 * run will stop there and keep only what precedes it. The culprit, counted
 * only up to the limit, is counted in full: the run's error names its size.
 */
export async function cutAtFirstFailure(prepared: PreparedBatch): Promise<PreparedBatch> {
  let first = prepared.failed[0];
  if (!first) return prepared;
  if (first.tokens === undefined && first.reason === 'context_length' && first.limitTokens) {
    // Should the count fail, the error still names the culprit and the limit.
    const [tokens] = await countTokens([first.message.content]).catch(ifCountFails(() => []));
    first = overLimit(first, first.limitTokens, tokens);
  }
  return {
    ...prepared,
    toSend: prepared.toSend.filter((i) => i.position < first.position),
    failed: [first, ...prepared.failed.slice(1)],
  };
}

/**
 * Embeds a prepared batch. A request that fails because of one input is
 * narrowed down to that input (by the index the server names, else by
 * halving), so its batch-mates are embedded and only the culprit is reported.
 */
export async function sendBatch(
  prepared: PreparedBatch,
  settings: BatchSettings,
  control?: SendControl,
): Promise<BatchOutcome> {
  const outcome: BatchOutcome = {
    embedded: [],
    failed: [...prepared.failed],
    unsent: [],
    attempts: 0,
    sends: 0,
  };
  const preFailed = outcome.failed.length;
  for (const part of await requestParts(prepared.toSend, settings)) {
    await sendIsolating(part, settings, outcome, false, control);
  }

  const rejected = outcome.failed.slice(preFailed).filter((f) => f.reason === 'rejected_input');
  if (prepared.toSend.length > 1 && rejected.length === prepared.toSend.length) {
    // Every input refused on its own: the request is wrong, not the inputs.
    throw new ProviderFatalError(
      `every input of a batch was refused on its own (${rejected[0]?.detail}); the request itself is wrong: check --model and --dimensions`,
      rejected[0]?.status,
    );
  }
  outcome.embedded.sort((a, b) => a.position - b.position);
  outcome.failed.sort((a, b) => a.position - b.position);
  outcome.unsent.sort((a, b) => a.position - b.position);
  return outcome;
}

/** Splits inputs into requests within the per-request input and token caps. */
export async function requestParts(
  inputs: Input[],
  caps: Pick<BatchSettings, 'maxRequestInputs' | 'maxRequestTokens'>,
): Promise<Input[][]> {
  const parts: Input[][] = [];
  let part: Input[] = [];
  let tokens = 0;
  for (const input of inputs) {
    // Bytes bound an uncounted input's tokens; where the bound would cut
    // the request short of the cap, its exact count decides instead.
    // A failed count leaves the bound, which only cuts the request sooner.
    if (input.tokens === undefined && tokens + input.bytes > caps.maxRequestTokens) {
      [input.tokens] = await countTokens([input.text]).catch(ifCountFails(() => []));
    }
    if (
      part.length > 0 &&
      (part.length >= caps.maxRequestInputs || tokens + upTo(input) > caps.maxRequestTokens)
    ) {
      parts.push(part);
      part = [];
      tokens = 0;
    }
    part.push(input);
    tokens += upTo(input);
  }
  if (part.length > 0) parts.push(part);
  return parts;
}

/**
 * What stands in for counts the counting thread could not make (its
 * TokenCountError); any other error is not a count's, and goes on.
 */
function ifCountFails<T>(fallback: () => T): (error: unknown) => T {
  return (error) => {
    if (error instanceof TokenCountError) return fallback();
    throw error;
  };
}

/** An input's tokens, or at most that many: its bytes, when it was not counted. */
function upTo(input: { tokens: number | undefined; bytes: number }): number {
  return input.tokens ?? input.bytes;
}

/**
 * Counted now if it was not before, for a failure's detail and what a broken
 * answer billed: here on the main thread, so a culprit is recorded, and
 * stops the sends after it, the moment its answer arrives.
 */
function counted(input: Input): number {
  return input.tokens ?? tokenCount(input.text);
}

/**
 * Each input's tokens once the provider has answered: its count where it has
 * one; else its share, by UTF-8 length, of what the provider reported for
 * the request beyond the counted inputs (largest remainder, so the shares
 * add up to the report); else, with no report, counted now.
 */
export async function answeredTokens(
  inputs: Input[],
  promptTokens: number | undefined,
): Promise<number[]> {
  const uncounted = inputs.filter((i) => i.tokens === undefined);
  if (uncounted.length === 0) return inputs.map((i) => i.tokens as number);
  if (promptTokens === undefined) {
    // The answer is in hand and billed: should the counting thread fail, the
    // main thread counts, and the vectors are kept.
    const texts = uncounted.map((i) => i.text);
    const counts = await countTokens(texts).catch(ifCountFails(() => texts.map(tokenCount)));
    const byInput = new Map(uncounted.map((input, k) => [input, counts[k] as number]));
    return inputs.map((i) => i.tokens ?? (byInput.get(i) as number));
  }
  const known = inputs.reduce((sum, i) => sum + (i.tokens ?? 0), 0);
  const share = Math.max(0, promptTokens - known);
  const bytes = uncounted.reduce((sum, i) => sum + i.bytes, 0);
  const exact = uncounted.map((i) => (bytes === 0 ? 0 : (share * i.bytes) / bytes));
  const floors = exact.map(Math.floor);
  let left = share - floors.reduce((sum, x) => sum + x, 0);
  const order = exact.map((x, k) => [x - Math.floor(x), k] as const).sort((a, b) => b[0] - a[0]);
  for (const [, k] of order) {
    if (left <= 0) break;
    floors[k] = (floors[k] as number) + 1;
    left--;
  }
  const shares = new Map(uncounted.map((input, k) => [input, floors[k] as number]));
  return inputs.map((i) => i.tokens ?? (shares.get(i) as number));
}

async function sendIsolating(
  given: Input[],
  settings: BatchSettings,
  outcome: BatchOutcome,
  retriedTruncated: boolean,
  control: SendControl | undefined,
): Promise<void> {
  // What the run would no longer keep is not sent (strict mode: nothing after
  // a culprit already known; nothing at all once the run is failing).
  const inputs = control ? control.sendable(given) : given;
  if (inputs.length < given.length) {
    outcome.unsent.push(...given.filter((i) => !inputs.includes(i)));
  }
  if (inputs.length === 0) return;
  // Exact when the rate gate needs it (countAll with --max-tpm); else a bound.
  const requestTokens = inputs.reduce((sum, i) => sum + upTo(i), 0);
  let tried = false;
  try {
    const { value } = await withRetries(async () => {
      await settings.beforeAttempt?.(requestTokens);
      // Right before sending, after any wait: the run may have learnt meanwhile
      // that it stops (another batch's culprit, a fatal error).
      if (control && control.sendable(inputs).length < inputs.length) throw new NotSentError();
      if (!tried) outcome.sends++;
      tried = true;
      outcome.attempts++;
      return settings.provider.embed(inputs.map((i) => i.text));
    }, settings.retry);
    const tokens = await answeredTokens(inputs, value.promptTokens);
    settings.onAnswered?.({
      tokens: value.promptTokens ?? tokens.reduce((sum, t) => sum + t, 0),
    });
    settings.onSent?.();
    inputs.forEach((input, i) => {
      outcome.embedded.push({
        position: input.position,
        message: input.message,
        vector: value.vectors[i] as Float32Array,
        tokens: tokens[i] as number,
        truncated: input.truncated,
      });
    });
  } catch (error) {
    if (error instanceof NotSentError || isStopped(error)) {
      // Not sent (or its retry cut by a stop signal): the batch keeps what
      // came before it, and the rest goes back to the queue.
      outcome.unsent.push(...inputs);
      return;
    }
    const failed = (f: Failure) => {
      outcome.failed.push(f);
      control?.onFailure?.(f);
    };
    if (error instanceof RetriesExhaustedError) {
      for (const input of inputs) failed(failure(input, 'retries_exhausted', error));
      return;
    }
    if (!(error instanceof InputRejectedError || error instanceof InvalidResponseError))
      throw error;
    // A 200 whose body broke the contract was answered, and is billed all the same.
    if (error instanceof InvalidResponseError) {
      settings.onAnswered?.({ tokens: inputs.reduce((sum, i) => sum + counted(i), 0) });
    }

    const reason = error instanceof InputRejectedError ? error.reason : 'invalid_response';
    const [only] = inputs;
    if (only && inputs.length === 1) {
      const limit = error instanceof InputRejectedError ? error.limitTokens : undefined;
      // The server knew a limit we did not: with --truncate, try once more within it.
      if (reason === 'context_length' && settings.truncate && limit && !retriedTruncated) {
        return sendIsolating([await truncated(only, limit)], settings, outcome, true, control);
      }
      failed(failure(only, reason, error));
      return;
    }
    const culprit = error.index !== undefined ? inputs[error.index] : undefined;
    if (culprit) {
      // Told first: in strict mode the rest is then sent only up to the culprit.
      failed(failure(culprit, reason, error));
      await sendIsolating(
        inputs.filter((i) => i !== culprit),
        settings,
        outcome,
        retriedTruncated,
        control,
      );
      return;
    }
    const half = Math.ceil(inputs.length / 2);
    await sendIsolating(inputs.slice(0, half), settings, outcome, retriedTruncated, control);
    await sendIsolating(inputs.slice(half), settings, outcome, retriedTruncated, control);
  }
}

/** A stop signal ended the request's retries: before the first attempt, or during a wait. */
function isStopped(error: unknown): boolean {
  return (
    error instanceof InterruptedError ||
    (error instanceof Error &&
      error.name === 'AbortError' &&
      error.cause instanceof InterruptedError)
  );
}

function failure(
  input: Input,
  reason: SkipReason,
  error: InputRejectedError | InvalidResponseError | RetriesExhaustedError,
): Failure {
  const limitTokens = error instanceof InputRejectedError ? error.limitTokens : undefined;
  const status = error instanceof InputRejectedError ? error.status : undefined;
  const tokens = counted(input);
  const size = limitTokens
    ? `${tokens} tokens, over the ${limitTokens}-token limit; `
    : `${tokens} tokens; `;
  return {
    position: input.position,
    message: input.message,
    reason,
    detail: `${size}provider: ${error.message}`,
    tokens,
    limitTokens,
    status,
  };
}

/** The input cut to its first `limit` tokens (on the counting thread). */
async function truncated(input: Input, limit: number): Promise<Input> {
  const { text, tokens } = await truncateWithin(input.message.content, limit);
  return { ...input, text, tokens, bytes: Buffer.byteLength(text, 'utf8'), truncated: true };
}
