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

const KNOWN_MODELS: Record<string, ModelInfo> = {
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
