import { TokenCountError } from '../errors.js';
import { startSiblingThread, ThreadCalls } from '../thread.js';
import type { CountAnswer, CountQuery } from './token-thread.js';

/**
 * cl100k counts, made on a thread of their own (token-thread.ts). On the
 * main thread, loading cl100k held everything for 80-124 ms: at 16 in flight
 * on PGlite a run's first four pages waited for it, and so did the scan's
 * next chunk, whose statements the main thread posts. And the corpus's 694
 * emails over 8,192 bytes took 2.5 s of it to count (BENCHMARKS.md,
 * "twelfth pass"). Here the main thread sends, commits and scans meanwhile.
 *
 * One thread per process, started on the first count: a run that needs no
 * count never starts it (its inputs all within the limit in bytes, a
 * provider that reports what it billed, no --max-tpm: src/worker/batch.ts).
 * It keeps the process alive only while a count is waiting on it.
 */
class CountingThread {
  readonly #calls: ThreadCalls<CountQuery, CountAnswer>;

  constructor() {
    // Beside this module: `.js` once compiled, `.ts` under tsx in tests.
    // A young generation of 4 MB: with V8's default the thread's heap grew
    // to 45-55 MiB over the corpus's 694 long emails against the main
    // thread's counting, ~16 MiB with 4 MB, at the same pace (3.8-4.0 s).
    const worker = startSiblingThread(import.meta.url, 'token-thread', {
      resourceLimits: { maxYoungGenerationSizeMb: 4 },
    });
    worker.unref();
    this.#calls = new ThreadCalls(worker, {
      refWhileWaiting: true,
      failure: (ended) =>
        new TokenCountError(
          'error' in ended
            ? `cannot count tokens: ${ended.error.message}`
            : `the token-counting thread stopped with exit code ${ended.exitCode}`,
        ),
    });
    worker.on('message', (answer: CountAnswer) => {
      if ('error' in answer)
        this.#calls.reject(answer.id, new TokenCountError(`cannot count tokens: ${answer.error}`));
      else this.#calls.resolve(answer.id, answer);
    });
  }

  /** Stopped or failed: a new thread takes the next count. */
  get broken(): boolean {
    return this.#calls.broken !== undefined;
  }

  ask(query: CountQuery): Promise<CountAnswer> {
    return this.#calls.call(query);
  }

  async stop(): Promise<void> {
    this.#calls.fail(new TokenCountError('the token-counting thread was stopped'));
    await this.#calls.worker.terminate();
  }
}

let thread: CountingThread | undefined;

function counting(): CountingThread {
  if (!thread || thread.broken) thread = new CountingThread();
  return thread;
}

/**
 * Ends the counting thread now. Counts waiting on it fail at once with a
 * TokenCountError, as they would if it crashed, and the next count starts a
 * new thread. The tests fail a count at a known point this way; a run never
 * needs it, as the thread holds no process open while idle.
 */
export async function stopCountingThread(): Promise<void> {
  const stopping = thread;
  thread = undefined;
  await stopping?.stop();
}

/** Each text's cl100k count, in order; none asked, no thread started. */
export async function countTokens(texts: readonly string[]): Promise<number[]> {
  if (texts.length === 0) return [];
  const answer = await counting().ask({ texts });
  return (answer as { counts: number[] }).counts;
}

/**
 * Each text's cl100k count where it is at most `limit` tokens; undefined
 * where it is over, counted no further than that (cl100k.ts, tokenCountWithin).
 */
export async function countTokensWithin(
  texts: readonly string[],
  limit: number,
): Promise<Array<number | undefined>> {
  if (texts.length === 0) return [];
  const answer = await counting().ask({ texts, limit });
  return (answer as { counts: Array<number | null> }).counts.map((n) => n ?? undefined);
}

/**
 * `text` cut to its first `limit` tokens (in whole code points), and the
 * cut's count: for --truncate (cl100k.ts, truncateWithin).
 */
export async function truncateWithin(
  text: string,
  limit: number,
): Promise<{ text: string; tokens: number }> {
  const answer = (await counting().ask({ truncate: text, limit })) as {
    text: string;
    tokens: number;
  };
  return { text: answer.text, tokens: answer.tokens };
}
