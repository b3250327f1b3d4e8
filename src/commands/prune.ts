import type { PruneSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { parseSource } from '../db/names.js';
import { type Pruned, pruneHistory } from '../sql/prune.js';

/** `pgembed prune`: deletes in one transaction what is older than `age`, a Postgres interval. */
export async function prune(settings: PruneSettings, age: string): Promise<number> {
  const source = parseSource(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'prune' });
  try {
    await requireMigrated(database.db, 'run `pgembed migrate` or `pgembed embed`');
    // A dry run deletes as the real one would, counts, and rolls back.
    const rollback = new Error('dry run');
    let pruned: Pruned | undefined;
    await database.db
      .transaction()
      .execute(async (trx) => {
        pruned = await pruneHistory(trx, source, age);
        if (settings.dryRun) throw rollback;
      })
      .catch((error: unknown) => {
        if (error !== rollback) throw error;
      });
    process.stdout.write(
      `${describe(pruned as Pruned, settings.pruneOlderThan ?? '', settings.dryRun)}\n`,
    );
  } finally {
    await database.close();
  }
  return 0;
}

function describe(pruned: Pruned, age: string, dryRun: boolean): string {
  const n = (count: number, what: string) => `${count.toLocaleString('en-US')} ${what}`;
  const removed = [
    n(pruned.runs, 'runs'),
    n(pruned.batches, 'batch rows'),
    n(pruned.skips, 'skips'),
  ];
  return `${dryRun ? 'would remove' : 'removed'} (older than ${age}): ${removed.join(', ')}; kept each model's latest run, running runs, and ${n(pruned.skipsKept, 'older skips')} of messages still not embedded${dryRun ? ' (dry run: nothing was deleted)' : ''}`;
}
