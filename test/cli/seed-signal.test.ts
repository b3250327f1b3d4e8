import { existsSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { sql } from 'kysely';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { type Database, openDatabase } from '../../src/db/connect.js';
import { LOCK_FILE } from '../../src/db/pglite-lock.js';
import { isLog, type RunningCli, runCli, startCli } from '../support/cli.js';
import { createTestDatabase, type TestDatabase } from '../support/db.js';

// Seed writes 200 rows per INSERT; 20,000 lines are 100 batches, far more
// than commit before the test's hold (below) stops the seed.
const LINES = 20_000;
const CHUNK_ROWS = 200;
const BATCH_COMMITTED = 'seed batch committed';
const STOPPING = 'stopping after the batch being written commits; signal again to exit at once';
// Opening PGlite and migrating takes seconds, tens of them on a loaded machine:
// bounds for a hang, not for speed.
const WAIT_MS = 120_000;
const TEST_MS = 300_000;

async function countMessages(url: string): Promise<number> {
  const database = await openDatabase(url, { notice: () => {} });
  try {
    const { n } = await database.db
      .selectFrom('messages')
      .select((eb) => eb.fn.countAll<string>().as('n'))
      .executeTakeFirstOrThrow();
    return Number(n);
  } finally {
    await database.close();
  }
}

/**
 * A client of the seed's served database in an open transaction: PGlite has
 * one session, so the seed's next batch waits until `release` ends it. The
 * seed cannot run to the end before the signal, whatever the machine's speed.
 */
async function holdSession(url: string): Promise<{ release: () => Promise<void> }> {
  const client: Database = await openDatabase(url, { notice: () => {} });
  let end!: () => void;
  const ended = new Promise<void>((resolve) => {
    end = resolve;
  });
  let holding!: () => void;
  const held = new Promise<void>((resolve) => {
    holding = resolve;
  });
  const transaction = client.db.transaction().execute(async (trx) => {
    await sql`select 1`.execute(trx);
    holding();
    await ended;
  });
  // If the transaction fails before it holds the session, say so rather than hang.
  await Promise.race([held, transaction]);
  return {
    async release() {
      end();
      // The seed may be gone (a second signal): the commit then fails; nothing was written.
      await transaction.catch(() => {});
      await client.close();
    },
  };
}

describe('seed stops cleanly on a signal (PGlite)', () => {
  let database: TestDatabase;
  let dir: string;
  let file: string;
  let running: RunningCli | undefined;

  beforeEach(async () => {
    database = await createTestDatabase('pglite');
    dir = database.url.slice('pglite:'.length);
    // Beside the PGlite directory, not in it: that directory is PGlite's own.
    file = `${dir}.jsonl`;
    writeFileSync(
      file,
      `${Array.from({ length: LINES }, (_, i) =>
        JSON.stringify({ id: i + 1, content: `message number ${i + 1}` }),
      ).join('\n')}\n`,
    );
  });
  afterEach(async () => {
    if (running && running.child.exitCode === null && running.child.signalCode === null) {
      running.child.kill('SIGKILL');
      await running.result.catch(() => {});
    }
    running = undefined;
    await database?.drop();
    rmSync(file, { force: true });
  });

  function startSeed(): RunningCli {
    running = startCli(
      'seed',
      ['--jsonl', file],
      { DATABASE_URL: database.url, LOG_LEVEL: 'debug' },
      { timeoutMs: TEST_MS },
    );
    return running;
  }

  it(
    'on SIGINT commits the batch being written, closes the database, releases the lock, says how many were seeded and exits 130; a rerun adds the rest',
    async () => {
      const seed = startSeed();
      // At least one batch is committed before the signal.
      await seed.waitForStdoutLine((line) => isLog(line, BATCH_COMMITTED), WAIT_MS);
      const hold = await holdSession(database.url);
      try {
        seed.child.kill('SIGINT');
        // The handler has taken the signal while the seed's next batch waits on the hold.
        await seed.waitForStdoutLine((line) => isLog(line, STOPPING), WAIT_MS);
      } finally {
        await hold.release();
      }
      const result = await seed.result;

      expect(result.code, result.stderr).toBe(130);
      const stopped =
        /^pgembed: stopped by SIGINT: seeded (\d+) messages \((\d+) new or changed\) before the stop/m.exec(
          result.stderr,
        );
      expect(stopped, result.stderr).not.toBeNull();
      const seeded = Number(stopped?.[1]);
      expect(Number(stopped?.[2])).toBe(seeded);
      // Whole batches only, at least the one seen committed, well short of the end.
      expect(seeded % CHUNK_ROWS).toBe(0);
      expect(seeded).toBeGreaterThanOrEqual(CHUNK_ROWS);
      expect(seeded).toBeLessThan(LINES);
      expect(result.stderr.match(/stopped by/g)).toHaveLength(1);
      expect(existsSync(join(dir, LOCK_FILE)), 'the lock is released').toBe(false);
      // The next process opens the directory itself: no stale lock to take over.
      expect(result.stderr).not.toContain('took over');
      expect(await countMessages(database.url)).toBe(seeded);

      const rerun = await runCli(
        'seed',
        ['--jsonl', file],
        { DATABASE_URL: database.url },
        { timeoutMs: TEST_MS },
      );
      expect(rerun.code, rerun.stderr).toBe(0);
      expect(rerun.stderr).not.toContain('took over');
      expect(rerun.stderr).toContain(`seeded ${LINES} messages (${LINES - seeded} new or changed)`);
      expect(await countMessages(database.url)).toBe(LINES);
    },
    TEST_MS,
  );

  it(
    'exits at once on a second signal while a batch waits, and leaves no lock behind',
    async () => {
      const seed = startSeed();
      await seed.waitForStdoutLine((line) => isLog(line, BATCH_COMMITTED), WAIT_MS);
      const hold = await holdSession(database.url);
      try {
        seed.child.kill('SIGINT');
        await seed.waitForStdoutLine((line) => isLog(line, STOPPING), WAIT_MS);
        expect(seed.child.exitCode, 'the first signal waits for the batch').toBeNull();
        seed.child.kill('SIGINT');
        // Still held: only the second signal can have ended the seed.
        const result = await seed.result;
        expect(result.code, result.stderr).toBe(130);
        expect(result.stderr).toContain('second SIGINT, exiting now');
        expect(result.stderr).not.toContain('stopped by');
      } finally {
        await hold.release();
      }
      expect(existsSync(join(dir, LOCK_FILE)), 'the lock is released').toBe(false);
      const count = await countMessages(database.url);
      expect(count % CHUNK_ROWS).toBe(0);
      expect(count).toBeGreaterThanOrEqual(CHUNK_ROWS);
      expect(count).toBeLessThan(LINES);
    },
    TEST_MS,
  );
});
