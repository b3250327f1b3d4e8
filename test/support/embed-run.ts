import { type Kysely, sql } from 'kysely';
import { afterAll, beforeAll, beforeEach } from 'vitest';
import { buildEmbedConfig, type FlagValues } from '../../src/config.js';
import type { Database } from '../../src/db/connect.js';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import type { EmbeddingColumnType } from '../../src/db/names.js';
import type { DB } from '../../src/db/schema.js';
import { createLogger } from '../../src/log.js';
import { openAIProviderFor } from '../../src/provider/create.js';
import { upsertMessages } from '../../src/sql/seed.js';
import type { BatchCommitter } from '../../src/worker/commit.js';
import { EmbedRun, type RunDeps } from '../../src/worker/run.js';
import { type BackendName, createTestDatabase, openMigrated, type TestDatabase } from './db.js';
import { type FakeOpenAI, type FakeOpenAIOptions, startFakeOpenAI } from './fake-openai.js';

export interface RunHarnessContext {
  db: Kysely<DB>;
  columnType: EmbeddingColumnType;
  /** How batches commit, as the CLI chooses it (Database.batchCommitter). */
  committer: BatchCommitter;
  /** The database is one session, as the CLI tells it (RunDeps.oneSession). */
  oneSession?: boolean;
  /** The fake server's base URL. */
  baseUrl: string;
}

/**
 * An in-process EmbedRun wired as the CLI wires it, against the fake server.
 * Defaults keep tests quick: batches of 4, retry waits of at most 20 ms.
 */
export function makeRun(
  ctx: RunHarnessContext,
  flags: FlagValues = {},
  extra: Partial<Pick<RunDeps, 'progressDisplay' | 'logger' | 'progressIntervalMs'>> = {},
) {
  const config = buildEmbedConfig(
    { 'batch-size': '4', 'max-retry-wait-ms': '20', ...flags },
    { OPENAI_BASE_URL: ctx.baseUrl },
  );
  const provider = openAIProviderFor(config);
  const reports: string[] = [];
  const run = new EmbedRun({
    db: ctx.db,
    committer: ctx.committer,
    oneSession: ctx.oneSession,
    provider,
    config,
    logger: extra.logger ?? createLogger('silent'),
    report: (text) => reports.push(text),
    progressDisplay: extra.progressDisplay,
    progressIntervalMs: extra.progressIntervalMs,
  });
  return { run, reports };
}

/**
 * The default model's target, made as if its first run had scanned already:
 * the capture triggers then queue what is seeded after, and a run claims it
 * from the queue (a model's first run takes what its own scan claims for
 * it instead: ScanHandoff).
 */
export async function backfilledTarget(db: Kysely<DB>): Promise<void> {
  await sql`insert into embedding_targets (provider, model, backfilled_at)
            values ('openai', 'text-embedding-3-small', now())`.execute(db);
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

/**
 * Polls `check` (a database query, say) until it holds. There is no deadline
 * of its own unless given: how long a condition takes depends on the machine's
 * load, so by default only the test's own timeout ends the wait.
 */
export async function waitFor(check: () => Promise<boolean>, timeoutMs?: number): Promise<void> {
  const deadline = timeoutMs === undefined ? Number.POSITIVE_INFINITY : Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`condition not met within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * The per-file fixture of worker tests: this file's own migrated database on
 * `backend`, a fake server, and empty tables before each test. Returns
 * getters, since the values exist only once beforeAll has run.
 */
export function useWorkerFixture(
  backend: BackendName,
  fakeDefaults: Partial<FakeOpenAIOptions> = {},
) {
  let target: TestDatabase;
  let database: Database;
  let columnType: EmbeddingColumnType;
  let fake: FakeOpenAI;
  beforeAll(async () => {
    target = await createTestDatabase(backend);
    database = await openMigrated(target.url);
    columnType = await readEmbeddingColumnType(database.db);
    fake = await startFakeOpenAI(fakeDefaults);
  });
  afterAll(async () => {
    await fake?.close();
    await database?.close();
    await target?.drop();
  });
  beforeEach(async () => {
    fake.reset();
    // Options a test changed go back to this file's defaults.
    Object.assign(fake.options, {
      latencyMs: 0,
      maxTpm: undefined,
      maxTpmBurst: undefined,
      clock: undefined,
      dialect: 'openai',
      maxInputTokens: 8192,
      models: undefined,
      shuffle: false,
      ...fakeDefaults,
    });
    await sql`truncate messages, message_embeddings, embedding_runs, embedding_targets, embedding_queue cascade`.execute(
      database.db,
    );
  });
  return {
    get database() {
      return database;
    },
    /** DATABASE_URL of this file's database, for spawned workers. */
    get url() {
      return target.url;
    },
    get fake() {
      return fake;
    },
    /** What makeRun needs, wired as the CLI wires it. */
    ctx(): RunHarnessContext {
      return {
        db: database.db,
        columnType,
        committer: database.batchCommitter(columnType),
        oneSession: database.oneSession,
        baseUrl: fake.url,
      };
    },
  };
}
