/**
 * pgembed as a library: what an application needs to reach the embeddings
 * the `pgembed` command keeps (open the same database, migrate it, search it,
 * embed a query with the same provider), and the named errors every part
 * throws. The worker itself runs as the command (`pgembed embed`), where
 * signals, exit codes and the progress display are handled.
 */

export { type Database, type OpenOptions, openDatabase } from './db/connect.js';
export { requireMigrated } from './db/embedding-column.js';
export { type MigrateOptions, type MigrateResult, migrateToLatest } from './db/migrator.js';
export {
  DEFAULT_SOURCE,
  type EmbeddingColumnType,
  type IdType,
  type MessageSource,
  parseDatabaseUrl,
  parseSource,
} from './db/names.js';
export type { DB } from './db/schema.js';
export {
  BudgetReachedError,
  ConfigError,
  DatabaseBusyError,
  DatabaseConnectionError,
  InputRejectedError,
  InterruptedError,
  InvalidResponseError,
  MigrationError,
  PgembedError,
  ProviderFailingError,
  ProviderFatalError,
  ProviderTransientError,
  RetriesExhaustedError,
  StrictModeError,
} from './errors.js';
export type { EmbeddingProvider, EmbedResult } from './provider/client.js';
export { createProvider, type ProviderSettings } from './provider/create.js';
export { nearestMessages, type SearchHit, type SearchTarget } from './sql/search.js';
