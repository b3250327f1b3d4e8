import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { buildEmbedConfig, SETTINGS } from '../src/config.js';
import { ConfigError } from '../src/errors.js';

const base = { OPENAI_BASE_URL: 'http://127.0.0.1:1/v1' };

describe('configuration', () => {
  it('lists every setting in .env.example with its default', () => {
    const lines = readFileSync(new URL('../.env.example', import.meta.url), 'utf8').split('\n');
    for (const def of Object.values(SETTINGS)) {
      const line = lines.find((l) => l.startsWith(`${def.env}=`));
      expect(line, `${def.env} missing from .env.example`).toBeDefined();
      const expected = 'default' in def ? String(def.default) : '';
      expect(line, `${def.env} default`).toBe(`${def.env}=${expected}`);
    }
  });

  it('documents every setting in the README', () => {
    const readme = readFileSync(new URL('../README.md', import.meta.url), 'utf8');
    for (const def of Object.values(SETTINGS)) {
      expect(readme, `${def.env} missing from README`).toContain(`\`${def.env}\``);
      if ('flag' in def)
        expect(readme, `--${def.flag} missing from README`).toContain(`--${def.flag}`);
    }
  });

  it('takes a flag over the environment, and the environment over the default', () => {
    expect(buildEmbedConfig({}, base).batchSize).toBe(64);
    expect(buildEmbedConfig({}, { ...base, PGEMBED_BATCH_SIZE: '16' }).batchSize).toBe(16);
    expect(
      buildEmbedConfig({ 'batch-size': '8' }, { ...base, PGEMBED_BATCH_SIZE: '16' }).batchSize,
    ).toBe(8);
    expect(
      buildEmbedConfig({ 'no-migrate': true }, { ...base, PGEMBED_MIGRATE: 'true' }).migrate,
    ).toBe(false);
    expect(buildEmbedConfig({}, { ...base, PGEMBED_ALLOW_PARTIAL: 'yes' }).allowPartial).toBe(true);
  });

  it('is frozen', () => {
    const config = buildEmbedConfig({}, base);
    expect(Object.isFrozen(config)).toBe(true);
  });

  it("uses the model's known context limit unless told otherwise, and none for an unknown model", () => {
    expect(buildEmbedConfig({}, base).effectiveMaxInputTokens).toBe(8192);
    expect(buildEmbedConfig({ 'max-input-tokens': '512' }, base).effectiveMaxInputTokens).toBe(512);
    expect(
      buildEmbedConfig({ model: 'nomic-embed-text' }, base).effectiveMaxInputTokens,
    ).toBeUndefined();
  });

  it.for([
    [{ 'batch-size': '0' }, {}, /^--batch-size must be 1 to 2048, got 0$/],
    [{ 'batch-size': '2049' }, {}, /^--batch-size must be 1 to 2048, got 2049$/],
    [{ limit: 'ten' }, {}, /^--limit must be a whole number \(1 or more\), got 'ten'$/],
    [{}, { PGEMBED_LIMIT: '-3' }, /^PGEMBED_LIMIT must be a whole number/],
    [{}, { PGEMBED_FORCE: 'maybe' }, /^PGEMBED_FORCE must be true or false, got 'maybe'$/],
    [{}, { LOG_LEVEL: 'loud' }, /^LOG_LEVEL must be one of fatal, error/],
    [{}, { DATABASE_URL: 'mysql://x' }, /^DATABASE_URL has unsupported scheme 'mysql'/],
    [{}, { OPENAI_BASE_URL: 'not a url' }, /^OPENAI_BASE_URL is not a URL/],
  ] as const)('rejects %o %o with a one-line error naming the setting', ([flags, env, message]) => {
    const attempt = () => buildEmbedConfig(flags, { ...base, ...env });
    expect(attempt).toThrow(ConfigError);
    expect(attempt).toThrow(message);
  });

  it('uses the local model when neither OPENAI_API_KEY nor OPENAI_BASE_URL is set', () => {
    expect(buildEmbedConfig({}, {})).toMatchObject({
      provider: 'local',
      model: 'universal-sentence-encoder-lite',
      localByDefault: true,
      effectiveMaxInputTokens: 2048,
    });
    expect(buildEmbedConfig({}, { OPENAI_API_KEY: 'sk-x' })).toMatchObject({
      provider: 'openai',
      model: 'text-embedding-3-small',
      localByDefault: false,
    });
    expect(buildEmbedConfig({}, { OPENAI_BASE_URL: 'http://localhost:11434/v1' }).provider).toBe(
      'openai',
    );
  });

  it('asks for OPENAI_API_KEY when an OpenAI provider is named without a key or base URL', () => {
    expect(() => buildEmbedConfig({ provider: 'openai' }, {})).toThrow(
      /^OPENAI_API_KEY is not set/,
    );
  });

  it('refuses a model or dimension the local model does not have, naming the setting', () => {
    expect(() =>
      buildEmbedConfig({ provider: 'local', model: 'text-embedding-3-small' }, {}),
    ).toThrow(/^--model text-embedding-3-small is not available with --provider local/);
    expect(() => buildEmbedConfig({ dimensions: '256' }, {})).toThrow(/^--dimensions 256/);
  });

  it('turns --max-cost-usd into tokens at the model price, the lower of it and --max-tokens', () => {
    // text-embedding-3-small: $0.02 a million tokens.
    expect(buildEmbedConfig({ 'max-cost-usd': '0.01' }, base).budgetTokens).toBe(500_000);
    expect(
      buildEmbedConfig({ 'max-cost-usd': '0.01', 'max-tokens': '1000' }, base).budgetTokens,
    ).toBe(1000);
    expect(
      buildEmbedConfig({ 'max-cost-usd': '1', 'price-per-m-tokens': '0.5' }, base).budgetTokens,
    ).toBe(2_000_000);
    expect(buildEmbedConfig({}, base).budgetTokens).toBeUndefined();
    expect(() => buildEmbedConfig({ 'max-cost-usd': '1', model: 'my-own-model' }, base)).toThrow(
      /^--max-cost-usd needs a price: .* give --price-per-m-tokens/,
    );
  });
});
