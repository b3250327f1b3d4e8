import { sql } from 'kysely';
import type { Database } from '../db/connect.js';
import { pendingMigrations } from '../db/migrator.js';
import { oneLine } from '../errors.js';
import type { ReadinessCheck } from './http.js';

/**
 * Ready as an orchestrator means it: the database answers, every migration
 * this code has is applied (not so with --no-migrate against an older schema),
 * and the provider is not failing batch after batch (the circuit breaker is
 * open). Each answer is one line, with no URL or key in it.
 */
export function workerReadiness(
  database: Database,
  provider: { failing(): boolean },
): ReadinessCheck {
  return async () => {
    try {
      await sql`select 1`.execute(database.db);
    } catch (error) {
      return `database unreachable (${oneLine(error)})`;
    }
    const pending = await pendingMigrations(database);
    if (pending.length > 0) return `migrations not applied: ${pending.join(', ')}`;
    if (provider.failing()) {
      return 'the provider is failing: batches keep failing with nothing embedded';
    }
    return undefined;
  };
}
