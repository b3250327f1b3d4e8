import { resolveSettings } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { migrateToLatest } from '../db/migrator.js';
import { ConfigError } from '../errors.js';
import { createLogger } from '../log.js';
import { jsonLines, type SeedMessage, spamAssassin, spamAssassinText } from '../seed/sources.js';
import { upsertMessages } from '../sql/seed.js';
import { helpText, parseFlags } from './args.js';
import { announceServing, runCli, warnLoudly } from './main.js';

const SETTINGS = ['databaseUrl', 'embeddingColumnType', 'logLevel'] as const;
const EXTRA = {
  corpus: { type: 'string' },
  jsonl: { type: 'string' },
  limit: { type: 'string' },
} as const;
// Rows per INSERT: emails average ~8 KB, so 200 keeps a statement near 2 MB.
const CHUNK_ROWS = 200;

await runCli(async (argv) => {
  const args = parseFlags(argv, SETTINGS, EXTRA);
  if (args.help) {
    const usage = 'npm run seed -- --corpus spamassassin [--limit N] | --jsonl FILE';
    process.stdout.write(
      `${helpText(usage, SETTINGS, ['  --corpus spamassassin   the 6,046-email SpamAssassin corpus, ids 1..6046', '  --corpus spamassassin-text  the same emails as Subject and body, headers dropped', '  --jsonl FILE            one {"id", "content", "role"?, "conversation_id"?} per line', '  --limit N               only the first N corpus messages', ''])}\n`,
    );
    return 0;
  }
  const { corpus, jsonl, limit } = args.flags as Record<string, string | undefined>;
  if (!corpus === !jsonl)
    throw new ConfigError('seed needs exactly one of --corpus spamassassin or --jsonl FILE');
  if (corpus && corpus !== 'spamassassin' && corpus !== 'spamassassin-text')
    throw new ConfigError(`--corpus must be spamassassin or spamassassin-text, got '${corpus}'`);
  if (limit !== undefined && !/^[1-9]\d*$/.test(limit))
    throw new ConfigError(`--limit must be a whole number of 1 or more, got '${limit}'`);
  const settings = resolveSettings(SETTINGS, args.flags, process.env);
  const logger = createLogger(settings.logLevel);
  const database = await openDatabase(settings.databaseUrl, { command: 'seed', serve: true });
  announceServing(database, logger, false);
  try {
    await migrateToLatest(database, {
      forcedColumnType: settings.embeddingColumnType,
      warn: warnLoudly(logger),
    });
    const corpusLimit = limit ? Number(limit) : undefined;
    const source: Iterable<SeedMessage> | AsyncIterable<SeedMessage> =
      corpus === 'spamassassin-text'
        ? spamAssassinText(corpusLimit)
        : corpus
          ? spamAssassin(corpusLimit)
          : jsonLines(jsonl as string);
    let read = 0;
    let changed = 0;
    let chunk: SeedMessage[] = [];
    for await (const message of source) {
      chunk.push(message);
      read++;
      if (chunk.length === CHUNK_ROWS) {
        changed += await upsertMessages(database.db, chunk);
        chunk = [];
      }
    }
    changed += await upsertMessages(database.db, chunk);
    logger.info(
      { read, inserted_or_changed: changed, database: database.describe },
      'seeded messages',
    );
    process.stderr.write(`pgembed: seeded ${read} messages (${changed} new or changed)\n`);
  } finally {
    await database.close();
  }
  return 0;
});
