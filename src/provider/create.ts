import type { EmbeddingProvider } from './client.js';
import { createOpenAIProvider } from './client.js';
import { createLocalProvider } from './local.js';
import { knownModel, LOCAL_PROVIDER } from './models.js';

export interface ProviderSettings {
  provider: string;
  model: string;
  openaiApiKey: string | undefined;
  openaiBaseUrl: string | undefined;
  dimensions: number | undefined;
  timeoutMs: number;
}

/** The provider a config names: the bundled local model, or an OpenAI-compatible server. */
export async function createProvider(settings: ProviderSettings): Promise<EmbeddingProvider> {
  if (settings.provider === LOCAL_PROVIDER) return createLocalProvider();
  return openAIProviderFor(settings);
}

/** The OpenAI-compatible server a config names, with the model's known dimension. */
export function openAIProviderFor(settings: ProviderSettings): EmbeddingProvider {
  return createOpenAIProvider({
    apiKey: settings.openaiApiKey,
    baseURL: settings.openaiBaseUrl,
    model: settings.model,
    dimensions: settings.dimensions,
    defaultDimensions: knownModel(settings.model)?.dimensions,
    timeoutMs: settings.timeoutMs,
  });
}
