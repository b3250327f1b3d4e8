import type { EmbedConfig } from '../config.js';
import { openDatabase } from '../db/connect.js';
import { requireMigrated } from '../db/embedding-column.js';
import { migrateToLatest } from '../db/migrator.js';
import { inspectSource, readIdType } from '../db/source.js';
import { ConfigError } from '../errors.js';
import { createLogger } from '../log.js';
import { createProvider } from '../provider/create.js';
import { rateLimitKey } from '../provider/fingerprint.js';
import { LOCAL_PROVIDER } from '../provider/models.js';
import { observedProvider } from '../provider/observed.js';
import { redactUrl } from '../redact.js';
import { registerSource } from '../sql/capture.js';
import { dryRun, formatDryRun } from '../worker/dry-run.js';
import { EmbedRun } from '../worker/run.js';
import { announceServing, onStopSignals, warnLoudly } from './process.js';

/**
 * `pgembed embed`: migrate (unless told not to), check the source, then one
 * run, one-shot or --watch, with metrics when asked. `levelAsked`: a log
 * level was given, so info lines are wanted even behind a progress bar.
 */
export async function embed(config: EmbedConfig, levelAsked: boolean): Promise<number> {
  // On a terminal a progress bar shows the run; info lines would only break
  // it up, so they are left out unless a log level was asked for.
  // Not in watch mode: a watcher never ends, and its log lines are its progress.
  const showBar = process.stderr.isTTY === true && !config.dryRun && !config.watch;
  const logger = createLogger(showBar && !levelAsked ? 'warn' : config.logLevel);
  if (config.localByDefault) {
    const notice = `neither OPENAI_API_KEY nor OPENAI_BASE_URL is set: embedding offline with the bundled local model ${config.model} (512 dimensions); set one of them for OpenAI or a compatible server`;
    logger.info({ provider: config.provider, model: config.model }, notice);
    // Behind a progress bar info lines are off; a newcomer must still see this.
    if (showBar && !levelAsked) process.stderr.write(`pgembed: ${notice}\n`);
  }
  const database = await openDatabase(config.databaseUrl, {
    // Each batch in flight commits on its own connection, plus one for reads.
    poolMax: config.dbPoolSize ?? config.concurrency + 1,
    onIdleError: (error) => logger.warn({ err: error }, 'idle database connection failed'),
    command: config.dryRun ? 'embed --dry-run' : 'embed',
    // A run lasts; others (status, search, psql, a second embed) connect
    // through it rather than wait. A dry run is short: they wait for it.
    serve: !config.dryRun,
    commits: !config.dryRun,
  });
  announceServing(database, logger, showBar && !levelAsked);
  try {
    if (config.dryRun) {
      await inspectSource(database.db, config.messageSource);
      // Touches nothing: no migration, no run row, no API call.
      const report = await dryRun(database.db, config);
      logger.info({ ...report }, 'dry run');
      process.stderr.write(`${formatDryRun(report)}\n`);
      return 0;
    }
    const columnType = config.migrate
      ? (
          await migrateToLatest(database, {
            forcedColumnType: config.embeddingColumnType,
            warn: warnLoudly(logger),
            source: config.messageSource,
            triggers: config.triggers,
          })
        ).embeddingColumnType
      : await requireMigrated(database.db, 'run `pgembed migrate`, or drop --no-migrate');
    // With --no-migrate too: the one-source rule and the capture mode hold.
    if (!config.migrate) {
      await registerSource(database.db, config.messageSource, { triggers: config.triggers });
    }
    // The source must exist with usable columns before anything is embedded
    // (a missing one already failed the migration, which inspects it too).
    const idType = await inspectSource(database.db, config.messageSource);
    const storedIdType = await readIdType(database.db);
    if (storedIdType !== idType) {
      throw new ConfigError(
        `--id-column ${config.messageSource.idColumn} of ${config.messageSource.table} is ${idType}, but this database's embeddings are keyed by ${storedIdType}: one database (or schema) holds one id type; use another for this source`,
      );
    }
    const target = { provider: config.provider, model: config.model };
    const service =
      config.metricsPort === undefined
        ? undefined
        : await (await import('../service/worker-service.js')).startWorkerService(
            database,
            target,
            { host: config.metricsHost, port: config.metricsPort },
          );
    const metrics = service?.metrics;
    if (service) logger.info({ url: service.server.url }, 'serving /metrics, /healthz and /readyz');
    const provider = metrics
      ? observedProvider(await createProvider(config), (r) => metrics.request(r))
      : await createProvider(config);
    logger.info(
      {
        provider: config.provider,
        model: config.model,
        base_url:
          config.provider === LOCAL_PROVIDER
            ? null
            : redactUrl(config.openaiBaseUrl ?? 'https://api.openai.com/v1'),
        database: database.describe,
        embedding_column: columnType,
        mode: config.allowPartial ? 'partial' : 'strict',
      },
      'pgembed starting',
    );

    const run = new EmbedRun({
      db: database.db,
      committer: database.batchCommitter(columnType),
      idType,
      // This process holds PGlite's one session; a client of one another
      // process serves is connected as to a server.
      oneSession: database.oneSession,
      provider,
      config,
      logger,
      report: (text) => process.stderr.write(`${text}\n`),
      // cli-progress only where a bar is drawn.
      progressDisplay: showBar
        ? (await import('../report/progress-bar.js')).terminalProgressBar()
        : undefined,
      watchChanges: database.watchChanges,
      observer: metrics,
      rateLimitKey: rateLimitKey({
        ...target,
        baseUrl: config.openaiBaseUrl,
        apiKey: config.openaiApiKey,
      }),
    });
    onStopSignals((signal) => {
      // stop() first: it takes the progress bar down before anything is written.
      run.stop(signal);
      logger.warn({ signal }, 'stopping after the batch in flight; signal again to exit at once');
      // This process is going away: closing will not wait for the ones it serves.
      database.serving?.cutOffClients();
    });
    try {
      const outcome = await run.run();
      if (outcome.error) process.stderr.write(`pgembed: ${outcome.summary.error}\n`);
      return outcome.exitCode;
    } finally {
      await service?.server.close();
    }
  } finally {
    await database.close();
  }
}
