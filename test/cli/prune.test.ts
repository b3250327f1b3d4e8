import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import { runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, openMigrated } from '../support/db.js';

// One backend (the server where there is one); test/sql/prune.test.ts runs both.
const backend = backends().at(-1) ?? 'pglite';

describe(`npm run prune (${backend})`, () => {
  it('says what it would remove with --dry-run, removes it without, and refuses a bad age in one line', async () => {
    const target = await createTestDatabase(backend);
    try {
      const database = await openMigrated(target.url);
      for (const [model, days] of [
        ['a', 40],
        ['a', 35],
        ['a', 1],
      ] as const) {
        await sql`insert into embedding_runs (provider, model, host, pid, status, finished_at)
          values ('openai', ${model}, 'h', 1, 'succeeded', now() - ${`${days} days`}::interval)`.execute(
          database.db,
        );
      }
      await database.close();
      const env = { DATABASE_URL: target.url };

      const dry = await runCli('prune', ['--older-than', '30d', '--dry-run'], env);
      expect(dry.code, dry.stderr).toBe(0);
      expect(dry.stdout).toBe(
        "would remove (older than 30d): 2 runs, 0 batch rows, 0 skips; kept each model's latest run, running runs, and 0 older skips of messages still not embedded (dry run: nothing was deleted)\n",
      );
      const real = await runCli('prune', ['--older-than', '30d'], env);
      expect(real.code, real.stderr).toBe(0);
      expect(real.stdout).toMatch(/^removed \(older than 30d\): 2 runs, 0 batch rows, 0 skips;/);
      const again = await runCli('prune', ['--older-than', '30d'], env);
      expect(again.stdout).toMatch(/^removed \(older than 30d\): 0 runs,/);

      const bad = await runCli('prune', ['--older-than', '30 days'], env);
      expect(bad.code).toBe(1);
      expect(stderrLines(bad)).toEqual([
        "pgembed: --older-than '30 days' is not an age: give a whole number and a unit, d, h, m or s (30d, 12h)",
      ]);
      const none = await runCli('prune', [], env);
      expect(none.code).toBe(1);
      expect(none.stderr).toContain('--older-than is required');
    } finally {
      await target.drop();
    }
  }, 120_000);
});
