import { PgembedError } from '../errors.js';
import type { EmbeddingProvider } from './client.js';

/** How one request ended, as an operator groups them. */
export type RequestOutcome = 'ok' | '429' | '5xx' | '4xx' | 'network';

export interface RequestRecord {
  outcome: RequestOutcome;
  seconds: number;
  /** The classified error's code (provider_transient, input_rejected, …); none when it worked. */
  errorClass: string | undefined;
}

/**
 * The provider, with every request reported as it ends: its outcome, its
 * time and, for a failure, the class classify.ts gave it. Each attempt is a
 * request: the retries are p-retry's, around this.
 */
export function observedProvider(
  provider: EmbeddingProvider,
  onRequest: (record: RequestRecord) => void,
): EmbeddingProvider {
  return {
    get expectedDimensions() {
      return provider.expectedDimensions;
    },
    async embed(inputs) {
      const startedAt = performance.now();
      const seconds = () => (performance.now() - startedAt) / 1000;
      try {
        const result = await provider.embed(inputs);
        onRequest({ outcome: 'ok', seconds: seconds(), errorClass: undefined });
        return result;
      } catch (error) {
        onRequest({
          outcome: outcomeOf(error),
          seconds: seconds(),
          errorClass: error instanceof PgembedError ? error.code.toLowerCase() : 'unclassified',
        });
        throw error;
      }
    },
  };
}

function outcomeOf(error: unknown): RequestOutcome {
  const status = (error as { status?: unknown }).status;
  if (typeof status !== 'number') {
    // A 200 whose vectors broke the contract (InvalidResponseError) was answered.
    return (error as { code?: unknown }).code === 'INVALID_RESPONSE' ? 'ok' : 'network';
  }
  if (status === 429) return '429';
  if (status >= 500) return '5xx';
  return '4xx';
}
