/** What we know of a model without asking it. Limits are OpenAI's published ones. */
export interface ModelInfo {
  /** Per-input context limit in tokens. */
  maxInputTokens: number;
  /** Default output dimension. */
  dimensions: number;
  encoding: 'cl100k_base' | 'o200k_base';
  /** List price, USD per million input tokens (OpenAI's pricing page, 2024-2026). */
  usdPerMillionTokens: number;
}

/** The bundled offline provider and its one model (see provider/local.ts). */
export const LOCAL_PROVIDER = 'local';
export const LOCAL_MODEL = 'universal-sentence-encoder-lite';

const KNOWN_MODELS: Record<string, ModelInfo> = {
  // Its own limit, in our (cl100k) tokens like every other: the model has no
  // hard one, but its tokenizer is quadratic in input length (8 kB ~0.3 s,
  // 100 kB 61 s, measured) and it averages every piece, so a long text says
  // little. 2,048 tokens is ~8 kB of English; 90% of the SpamAssassin emails.
  [LOCAL_MODEL]: {
    maxInputTokens: 2048,
    dimensions: 512,
    encoding: 'cl100k_base',
    usdPerMillionTokens: 0,
  },
  'text-embedding-3-small': {
    maxInputTokens: 8192,
    dimensions: 1536,
    encoding: 'cl100k_base',
    usdPerMillionTokens: 0.02,
  },
  'text-embedding-3-large': {
    maxInputTokens: 8192,
    dimensions: 3072,
    encoding: 'cl100k_base',
    usdPerMillionTokens: 0.13,
  },
  'text-embedding-ada-002': {
    maxInputTokens: 8192,
    dimensions: 1536,
    encoding: 'cl100k_base',
    usdPerMillionTokens: 0.1,
  },
};

export function knownModel(model: string): ModelInfo | undefined {
  return KNOWN_MODELS[model];
}
