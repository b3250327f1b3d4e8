import type { Kysely } from 'kysely';
import { buildEmbedConfig, type FlagValues } from '../../src/config.js';
import type { EmbeddingColumnType } from '../../src/db/embedding-column.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { createOpenAIProvider } from '../../src/provider/client.js';
import { knownModel } from '../../src/provider/models.js';
import { upsertMessages } from '../../src/sql/seed.js';
import { EmbedRun } from '../../src/worker/run.js';

export interface RunHarnessContext {
  db: Kysely<DB>;
  columnType: EmbeddingColumnType;
  /** The backend's binary COPY, as the CLI passes it (PGlite only). */
  copyFromBlob?: ((copySql: string, data: Uint8Array) => Promise<void>) | undefined;
  /** The fake server's base URL. */
  baseUrl: string;
}

/**
 * An in-process EmbedRun wired as the CLI wires it, against the fake server.
 * Defaults keep tests quick: batches of 4, retry waits of at most 20 ms.
 */
export function makeRun(ctx: RunHarnessContext, flags: FlagValues = {}) {
  const config = buildEmbedConfig(
    { 'batch-size': '4', 'max-retry-wait-ms': '20', ...flags },
    { OPENAI_BASE_URL: ctx.baseUrl },
  );
  const provider = createOpenAIProvider({
    apiKey: undefined,
    baseURL: config.openaiBaseUrl,
    model: config.model,
    dimensions: config.dimensions,
    defaultDimensions: knownModel(config.model)?.dimensions,
    timeoutMs: config.timeoutMs,
  });
  const reports: string[] = [];
  const run = new EmbedRun({
    db: ctx.db,
    columnType: ctx.columnType,
    copyFromBlob: ctx.copyFromBlob,
    provider,
    config,
    logger: createLogger('silent'),
    report: (text) => reports.push(text),
  });
  return { run, reports };
}

/** Messages with ids 1..n, or [id, content] pairs. */
export async function seedMessages(db: Kysely<DB>, contents: Array<string | [number, string]>) {
  await upsertMessages(
    db,
    contents.map((c, i) =>
      Array.isArray(c) ? { id: String(c[0]), content: c[1] } : { id: String(i + 1), content: c },
    ),
  );
}

export const sampleTexts = (n: number) =>
  Array.from({ length: n }, (_, i) => `message number ${i + 1}: ${'word '.repeat(i % 7)}`);

export async function waitFor(check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((r) => setTimeout(r, 20));
  }
}
