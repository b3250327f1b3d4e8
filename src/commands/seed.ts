import { setImmediate } from 'node:timers/promises';
import type { SeedSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { migrateToLatest } from '../db/migrator.js';
import { InterruptedError } from '../errors.js';
import { createLogger } from '../log.js';
import { jsonLines, type SeedMessage, spamAssassin, spamAssassinText } from '../seed/sources.js';
import { upsertMessages } from '../sql/seed.js';
import { announceServing, onStopSignals, warnLoudly } from './process.js';

// Rows per INSERT: emails average ~8 KB, so 200 keeps a statement near 2 MB.
const CHUNK_ROWS = 200;

/** Where `pgembed seed` reads its messages: a bundled corpus, or a JSON-lines file. */
export type SeedInput =
  | { corpus: 'spamassassin' | 'spamassassin-text'; limit: number | undefined }
  | { jsonl: string };

/** `pgembed seed`: upserts messages 200 to a statement, each its own transaction. */
export async function seed(settings: SeedSettings, input: SeedInput): Promise<number> {
  const logger = createLogger(settings.logLevel);
  const database = await openDatabase(settings.databaseUrl, { command: 'seed', serve: true });
  announceServing(database, logger, false);
  // The first signal stops seeding between batches: each batch is one INSERT,
  // its own transaction, so what committed stays and a rerun adds the rest.
  // The database is then closed, which releases the directory's lock.
  let stopSignal: NodeJS.Signals | undefined;
  let seeded = false;
  onStopSignals((signal) => {
    stopSignal = signal;
    logger.warn(
      { signal },
      seeded
        ? 'seeded; no longer waiting for connected clients'
        : 'stopping after the batch being written commits; signal again to exit at once',
    );
    // This process is going away: closing will not wait for the ones it serves.
    database.serving?.cutOffClients();
  });
  try {
    await migrateToLatest(database, {
      forcedColumnType: settings.embeddingColumnType,
      warn: warnLoudly(logger),
    });
    const source: Iterable<SeedMessage> | AsyncIterable<SeedMessage> =
      'jsonl' in input
        ? jsonLines(input.jsonl)
        : input.corpus === 'spamassassin-text'
          ? spamAssassinText(input.limit)
          : spamAssassin(input.limit);
    let read = 0;
    let committed = 0;
    let changed = 0;
    let chunk: SeedMessage[] = [];
    const write = async () => {
      changed += await upsertMessages(database.db, chunk);
      committed += chunk.length;
      logger.debug({ committed, inserted_or_changed: changed }, 'seed batch committed');
      chunk = [];
      // A corpus read with readFileSync into PGlite may never wait on I/O:
      // let a signal (and the clients served) in between batches.
      await setImmediate();
    };
    for await (const message of source) {
      // Messages read but not yet written are dropped: a rerun reads them again.
      if (stopSignal) break;
      chunk.push(message);
      read++;
      if (chunk.length === CHUNK_ROWS) await write();
    }
    if (!stopSignal && chunk.length > 0) await write();
    // A signal during the last batch is a stop too: the exit code says a signal came.
    if (stopSignal) {
      logger.info(
        { signal: stopSignal, seeded: committed, inserted_or_changed: changed },
        'seed stopped',
      );
      process.stderr.write(
        `pgembed: stopped by ${stopSignal}: seeded ${committed} messages (${changed} new or changed) before the stop; run the same seed again to add the rest, without duplicates\n`,
      );
      return new InterruptedError(stopSignal).exitCode;
    }
    seeded = true;
    logger.info(
      { read, inserted_or_changed: changed, database: database.describe },
      'seeded messages',
    );
    process.stderr.write(`pgembed: seeded ${read} messages (${changed} new or changed)\n`);
  } finally {
    await database.close();
  }
  return 0;
}
