import type { StatusSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { parseSource } from '../db/names.js';
import { formatStatus } from '../report/status.js';
import { budgets, coverage, latestRuns, queueDepth } from '../sql/status.js';

/** `pgembed status`: coverage, the queue, budgets and the latest runs, as text or JSON. */
export async function status(settings: StatusSettings): Promise<number> {
  const source = parseSource(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'status' });
  try {
    await requireMigrated(database.db, 'run `pgembed migrate` or `pgembed embed`');
    const report = {
      coverage: await coverage(database.db, source),
      queue: await queueDepth(database.db),
      budgets: await budgets(database.db),
      runs: await latestRuns(database.db, settings.statusRuns),
    };
    process.stdout.write(
      `${settings.json ? JSON.stringify(report, null, 2) : formatStatus(report)}\n`,
    );
  } finally {
    await database.close();
  }
  return 0;
}
