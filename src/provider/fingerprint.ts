import { createHash } from 'node:crypto';

/**
 * Who the provider is rate-limited as, without the key: the provider label,
 * the model (OpenAI limits each model apart) and the first 16 hex digits of
 * sha256(base URL, key). Workers with the same key on the same server share
 * a budget; the key itself is never stored or shown.
 */
export function rateLimitKey(target: {
  provider: string;
  model: string;
  baseUrl: string | undefined;
  apiKey: string | undefined;
}): string {
  const fingerprint = createHash('sha256')
    .update(`${target.baseUrl ?? 'https://api.openai.com/v1'}\n${target.apiKey ?? ''}`)
    .digest('hex')
    .slice(0, 16);
  return `${target.provider}/${target.model}/${fingerprint}`;
}
