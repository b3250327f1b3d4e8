import type { MigrateSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { migrateToLatest } from '../db/migrator.js';
import { parseSource } from '../db/names.js';
import { createLogger } from '../log.js';
import { warnLoudly } from './process.js';

/** `pgembed migrate`: the schema up to date, and the source's change capture in place. */
export async function migrate(settings: MigrateSettings): Promise<number> {
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
}
