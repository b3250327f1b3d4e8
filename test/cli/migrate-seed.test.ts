import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { logRecords, runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';

let scratch: string;
beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), 'pgembed-cli-'));
});
afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
});

function writeJsonl(name: string, lines: string[]): string {
  const file = join(scratch, name);
  writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

async function countMessages(url: string): Promise<number> {
  const database = await openDatabase(url);
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

describe.each(backends())('migrate and seed against %s', (backend) => {
  // One database, fresh and unmigrated, that the tests below take in order:
  // --no-migrate must see it unmigrated, then migrate migrates it. A fresh PGlite
  // directory costs seconds of initdb, so it is not paid for twice. The seed
  // tests do not depend on the others: seed migrates on its own.
  let database: TestDatabase;

  beforeAll(async () => {
    database = await createTestDatabase(backend);
  });
  afterAll(async () => {
    await database?.drop();
  });

  it('tells the user to run pgembed migrate when --no-migrate meets an unmigrated database', async () => {
    const result = await runCli('embed', ['--no-migrate'], {
      DATABASE_URL: database.url,
      OPENAI_BASE_URL: 'http://127.0.0.1:9/v1',
    });
    expect(result.code, result.stderr).toBe(1);
    const lines = stderrLines(result);
    expect(lines, result.stderr).toHaveLength(1);
    expect(lines[0]).toContain('pgembed migrate');
    expect(result.stderr).not.toMatch(/^\s+at /m);
  });

  it('migrates a fresh database and then exits 0 again as a no-op', async () => {
    const first = await runCli('migrate', [], { DATABASE_URL: database.url });
    expect(first.code, first.stderr).toBe(0);
    const [applied] = logRecords(first.stdout, 'migrations applied');
    expect(applied?.applied).not.toEqual([]);

    const second = await runCli('migrate', [], { DATABASE_URL: database.url });
    expect(second.code, second.stderr).toBe(0);
    const [upToDate] = logRecords(second.stdout, 'database is up to date');
    expect(upToDate?.applied).toEqual([]);
  });

  it('adds no duplicates when the same file is seeded twice', async () => {
    const file = writeJsonl(
      `good-${backend}.jsonl`,
      Array.from({ length: 5 }, (_, i) => JSON.stringify({ id: i + 1, content: `note ${i + 1}` })),
    );
    const first = await runCli('seed', ['--jsonl', file], { DATABASE_URL: database.url });
    expect(first.code, first.stderr).toBe(0);
    expect(first.stderr).toContain('seeded 5 messages (5 new or changed)');

    const second = await runCli('seed', ['--jsonl', file], { DATABASE_URL: database.url });
    expect(second.code, second.stderr).toBe(0);
    expect(second.stderr).toContain('seeded 5 messages (0 new or changed)');
    expect(await countMessages(database.url)).toBe(5);
  });

  it('rejects a JSONL line without an integer id in one line naming the file and line', async () => {
    const file = writeJsonl(`bad-${backend}.jsonl`, [
      '{"id": 101, "content": "fine"}',
      '{"content": "no id here"}',
    ]);
    const result = await runCli('seed', ['--jsonl', file], { DATABASE_URL: database.url });
    expect(result.code, result.stderr).toBe(1);
    const lines = stderrLines(result);
    expect(lines, result.stderr).toHaveLength(1);
    expect(lines[0]).toContain(`${file}:2:`);
    expect(lines[0]).toMatch(/"id" must be an integer/);
    expect(result.stderr).not.toMatch(/^\s+at /m);
  });
});
