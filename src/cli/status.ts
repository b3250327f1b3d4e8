import { resolveSettings, SOURCE_SETTINGS } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { parseSource } from '../db/source.js';
import { formatStatus } from '../report/status.js';
import { budgets, coverage, latestRuns, queueDepth } from '../sql/status.js';
import { helpText, parseFlags } from './args.js';
import { runCli } from './main.js';

const SETTINGS = ['databaseUrl', ...SOURCE_SETTINGS, 'json', 'statusRuns'] as const;

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS);
  if (args.help) {
    process.stdout.write(`${helpText('npm run status [-- --json]', SETTINGS)}\n`);
    return 0;
  }
  const settings = resolveSettings(SETTINGS, args.flags, process.env);
  const source = parseSource(settings);
  const database = await openDatabase(settings.databaseUrl, { poolMax: 1, command: 'status' });
  try {
    await requireMigrated(database.db, 'run `npm run migrate` or `npm run embed`');
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
});
