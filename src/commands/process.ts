import type { Database } from '../db/connect.js';
import { InterruptedError } from '../errors.js';
import type { Logger } from '../log.js';

/* What a command does with its process: lines a person must see, and signals. */

/**
 * For warnings a person must see once (the real[] fallback at migration): in
 * the log, and on stderr, where the human summary also goes.
 */
export function warnLoudly(logger: Logger): (message: string) => void {
  return (message) => {
    logger.warn(message);
    process.stderr.write(`pgembed: ${message}\n`);
  };
}

/**
 * A process that serves its embedded database says how to reach it: the
 * exact psql command, in the log and, where asked (a terminal whose info
 * lines are hidden behind the progress bar), on stderr.
 */
export function announceServing(database: Database, logger: Logger, onStderr: boolean): void {
  if (!database.serving) return;
  const line = `serving ${database.describe} to other processes while this runs: ${database.serving.psql}`;
  logger.info({ psql: database.serving.psql }, line);
  if (onStderr) process.stderr.write(`pgembed: ${line}\n`);
}

/**
 * The first SIGINT or SIGTERM calls `stop`, which lets the work in flight
 * commit before the command exits 130 / 143; a second exits at once.
 */
export function onStopSignals(stop: (signal: NodeJS.Signals) => void): void {
  let stopped = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (stopped) {
      process.stderr.write(`pgembed: second ${signal}, exiting now\n`);
      process.exit(new InterruptedError(signal).exitCode);
    }
    stopped = true;
    stop(signal);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
}
