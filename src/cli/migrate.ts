import { CAPTURE_SETTINGS, resolveSettings, SOURCE_SETTINGS } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { migrateToLatest } from '../db/migrator.js';
import { parseSource } from '../db/source.js';
import { createLogger } from '../log.js';
import { helpText, parseFlags } from './args.js';
import { runCli, warnLoudly } from './main.js';

const SETTINGS = [
  'databaseUrl',
  ...SOURCE_SETTINGS,
  ...CAPTURE_SETTINGS,
  'embeddingColumnType',
  'logLevel',
] as const;

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS);
  if (args.help) {
    process.stdout.write(`${helpText('npm run migrate', SETTINGS)}\n`);
    return 0;
  }
  const settings = resolveSettings(SETTINGS, args.flags, process.env);
  const logger = createLogger(settings.logLevel);
  const database = await openDatabase(settings.databaseUrl, { command: 'migrate' });
  try {
    const result = await migrateToLatest(database, {
      forcedColumnType: settings.embeddingColumnType,
      warn: warnLoudly(logger),
      source: parseSource(settings),
      triggers: settings.triggers,
    });
    logger.info(
      {
        database: database.describe,
        applied: result.applied,
        embedding_column: result.embeddingColumnType,
      },
      result.applied.length ? 'migrations applied' : 'database is up to date',
    );
  } finally {
    await database.close();
  }
  return 0;
});
