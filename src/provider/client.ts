import OpenAI from 'openai';
import { classifyProviderError } from './classify.js';
import { vectorsByIndex } from './validate.js';

export interface EmbedResult {
  /** One per input, in input order. */
  vectors: Float32Array[];
  /** Tokens the provider says it used, when it says. */
  promptTokens: number | undefined;
}

export interface EmbeddingProvider {
  /** Embeds inputs in one request. Throws classified errors (see classify.ts). */
  embed(inputs: string[]): Promise<EmbedResult>;
  /** Dimension the vectors must have; learnt from the first response when not configured. */
  readonly expectedDimensions: number | undefined;
}

/**
 * The SDK keeps only `body.error` of an error response, so bodies with a
 * top-level `message` (vLLM) lose their text. Keep the whole body on the error.
 */
class BodyKeepingOpenAI extends OpenAI {
  protected override makeStatusError(
    status: number,
    error: object,
    message: string | undefined,
    headers: Headers,
  ) {
    return Object.assign(super.makeStatusError(status, error, message, headers), { body: error });
  }
}

export interface OpenAIProviderOptions {
  apiKey: string | undefined;
  baseURL: string | undefined;
  model: string;
  dimensions: number | undefined;
  /** Expected when --dimensions is unset: the model's known size, if any. */
  defaultDimensions: number | undefined;
  timeoutMs: number;
}

export function createOpenAIProvider(options: OpenAIProviderOptions): EmbeddingProvider {
  const client = new BodyKeepingOpenAI({
    // Local servers (Ollama, vLLM, TEI) need no key, but the SDK insists on one.
    apiKey: options.apiKey ?? 'no-key',
    ...splitBaseUrl(options.baseURL),
    // p-retry owns retries (provider/retry.ts), so each attempt is counted once.
    maxRetries: 0,
    timeout: options.timeoutMs,
  });
  // Errors name the base URL as it was given (redacted where shown).
  const request = { model: options.model, baseURL: options.baseURL ?? client.baseURL };
  let expectedDimensions = options.dimensions ?? options.defaultDimensions;

  return {
    get expectedDimensions() {
      return expectedDimensions;
    },
    async embed(inputs) {
      let response: Awaited<ReturnType<typeof client.embeddings.create>>;
      try {
        response = await client.embeddings.create({
          model: options.model,
          input: inputs,
          // Explicit, so the SDK hands the field back untouched: left to itself it
          // asks for base64 and runs Buffer.from(…, 'base64') on whatever comes back,
          // which silently turns a float array from a server that ignores
          // encoding_format into a quarter-length vector of garbage. validate.ts
          // decodes either form.
          encoding_format: 'base64',
          ...(options.dimensions ? { dimensions: options.dimensions } : {}),
        });
      } catch (error) {
        throw classifyProviderError(error, request);
      }
      const vectors = vectorsByIndex(response.data, inputs.length, expectedDimensions);
      expectedDimensions ??= vectors[0]?.length;
      return { vectors, promptTokens: response.usage?.prompt_tokens };
    },
  };
}

/**
 * A query in the base URL (Azure's `api-version`, a proxy's `api-key`) must
 * reach every request, but the SDK appends `/embeddings` to the base URL as a
 * string, after the query, which then names another path. So the query goes
 * to the SDK's `defaultQuery`, and the base URL keeps scheme, host and path.
 */
export function splitBaseUrl(baseURL: string | undefined): {
  baseURL: string | undefined;
  defaultQuery?: Record<string, string>;
} {
  if (!baseURL) return { baseURL };
  const url = new URL(baseURL);
  if (!url.search && !url.hash) return { baseURL };
  const defaultQuery = Object.fromEntries(url.searchParams);
  url.search = '';
  url.hash = '';
  return Object.keys(defaultQuery).length
    ? { baseURL: url.toString(), defaultQuery }
    : { baseURL: url.toString() };
}
