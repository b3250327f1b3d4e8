import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { sql } from 'kysely';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { LOCK_FILE, type LockInfo } from '../../src/db/pglite-lock.js';
import { isLog, logRecords, runCli, startCli, stderrLines } from '../support/cli.js';
import { createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

// Two processes on one PGlite directory corrupt it (seen: run ids 1, 34, 35,
// 68, then "could not open file base/5/t0_20858"). These tests run real
// processes against one directory, as a user in two terminals would.
const MESSAGES = 120;

describe('one embedded database, many processes', () => {
  let database: TestDatabase;
  let dir: string;
  let fake: FakeOpenAI;
  const env = () => ({ DATABASE_URL: database.url, OPENAI_BASE_URL: fake.url });

  // One migrated, seeded directory, copied for each test: each test's
  // processes start from the same files, and no test pays for the setup.
  let template: TestDatabase;
  beforeAll(async () => {
    template = await createTestDatabase('pglite');
    const db = await openMigrated(template.url);
    try {
      await seedMessages(db.db, sampleTexts(MESSAGES));
    } finally {
      await db.close();
    }
  }, 120_000);
  afterAll(async () => {
    await template?.drop();
  });

  beforeEach(async () => {
    database = await createTestDatabase('pglite');
    dir = database.url.slice('pglite:'.length);
    cpSync(template.url.slice('pglite:'.length), dir, { recursive: true });
    fake = await startFakeOpenAI();
  });
  afterEach(async () => {
    await fake?.close();
    await database?.drop();
  });

  /** After every process has exited: the table, the runs, the lock. */
  async function finalState() {
    expect(existsSync(join(dir, LOCK_FILE)), 'the lock is gone with its holder').toBe(false);
    const db = await openDatabase(database.url);
    try {
      const embeddings = await sql<{ n: number; distinct_ids: number }>`
        select count(*)::int as n, count(distinct message_id)::int as distinct_ids
        from message_embeddings`.execute(db.db);
      const runs = await sql<{ id: string; status: string; embedded: number }>`
        select id, status, embedded from embedding_runs order by id`.execute(db.db);
      return { embeddings: embeddings.rows[0], runs: runs.rows };
    } finally {
      await db.close();
    }
  }

  it('status and psql reach the database while embed runs, and the run ends as it would alone', async () => {
    const hold = fake.hold();
    const embed = startCli('embed', ['--batch-size', '10', '--concurrency', '2'], env());
    const serving = await embed.waitForStdoutLine((line) => /"psql":/.test(line));
    const psql = (JSON.parse(serving) as { psql: string }).psql;
    expect(psql).toBe(`psql -h ${dir} -p 5432 -U postgres postgres`);
    await fake.until((stats) => stats.held >= 1);

    const status = await runCli('status', ['--json'], { DATABASE_URL: database.url });
    expect(status.code, status.stderr).toBe(0);
    const report = JSON.parse(status.stdout) as { runs: Array<{ status: string }> };
    expect(report.runs.map((run) => run.status)).toEqual(['running']);

    // The exact command the holder printed.
    const counted = spawnSync('sh', ['-c', `${psql} -At -c 'select count(*) from messages'`], {
      encoding: 'utf8',
    });
    expect(counted.stderr).toBe('');
    expect(counted.stdout.trim()).toBe(String(MESSAGES));

    hold.release();
    const result = await embed.result;
    expect(result.code, result.stderr).toBe(0);
    const lock = logRecords(result.stdout, 'pgembed starting')[0];
    expect(lock?.database).toBe(database.url);
    expect([...fake.stats.seen.values()].every((times) => times === 1)).toBe(true);
    expect(fake.stats.seen.size).toBe(MESSAGES);
    expect(await finalState()).toEqual({
      embeddings: { n: MESSAGES, distinct_ids: MESSAGES },
      runs: [{ id: '1', status: 'succeeded', embedded: MESSAGES }],
    });
  }, 120_000);

  it('a second embed started while one runs connects through it; they share the work', async () => {
    const hold = fake.hold();
    const first = startCli('embed', ['--batch-size', '10', '--concurrency', '2'], env());
    await fake.until((stats) => stats.held >= 1);
    const second = startCli('embed', ['--batch-size', '10', '--concurrency', '2'], env());
    const started = await second.waitForStdoutLine((line) => isLog(line, 'pgembed starting'));
    expect((JSON.parse(started) as { database: string }).database).toMatch(
      /^pglite:.* \(served by pid \d+\)$/,
    );
    // The second embed has claimed work of its own: a third request waits.
    await fake.until((stats) => stats.held >= 3);
    hold.release();
    const [one, two] = await Promise.all([first.result, second.result]);
    expect(one.code, one.stderr).toBe(0);
    expect(two.code, two.stderr).toBe(0);
    // Every input sent once, across both processes.
    expect(fake.stats.seen.size).toBe(MESSAGES);
    expect([...fake.stats.seen.values()].every((times) => times === 1)).toBe(true);
    const state = await finalState();
    expect(state.embeddings).toEqual({ n: MESSAGES, distinct_ids: MESSAGES });
    expect(state.runs.map((run) => run.status)).toEqual(['succeeded', 'succeeded']);
    expect(state.runs.reduce((sum, run) => sum + run.embedded, 0)).toBe(MESSAGES);
    expect(state.runs.every((run) => run.embedded > 0)).toBe(true);
  }, 120_000);

  it('a holder killed with kill -9 leaves a lock the next process takes over, saying so', async () => {
    const hold = fake.hold();
    // A short lease, so the rerun takes the dead run's range over soon.
    const embed = startCli(
      'embed',
      ['--batch-size', '10', '--concurrency', '2', '--lease-ms', '1000'],
      env(),
    );
    await fake.until((stats) => stats.held >= 1);
    const holder = JSON.parse(readFileSync(join(dir, LOCK_FILE), 'utf8')) as LockInfo;
    expect(holder.pid).toBe(embed.child.pid);
    embed.child.kill('SIGKILL');
    await embed.result;
    hold.release();

    const status = await runCli('status', [], { DATABASE_URL: database.url });
    expect(status.code, status.stderr).toBe(0);
    expect(stderrLines(status)).toEqual([
      expect.stringMatching(
        new RegExp(
          `^pgembed: took over the embedded database ${dir} from pid ${holder.pid} \\(embed, since .*\\), which is no longer running$`,
        ),
      ),
    ]);
    const rerun = await runCli('embed', ['--batch-size', '10'], env());
    expect(rerun.code, rerun.stderr).toBe(0);
    const state = await finalState();
    expect(state.embeddings).toEqual({ n: MESSAGES, distinct_ids: MESSAGES });
  }, 120_000);
});
