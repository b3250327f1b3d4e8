import { config as loadDotenv } from 'dotenv';
import { oneLine, PgembedError } from '../errors.js';
import { redactSecrets, rememberSecrets, secretsOfSettings } from '../redact.js';
import { terminalSafe } from '../report/terminal-safe.js';

/**
 * Runs a CLI command: loads .env (without overriding the real environment),
 * and maps errors to one line on stderr and an exit code. A stack trace only
 * with LOG_LEVEL=debug. Everything written to stderr (errors, the run's
 * summary, warnings) goes through redactSecrets, which also knows the
 * settings' own secrets (API key, base URL, database URL); the log does too
 * (see log.ts). Stdout is left alone: it carries the messages' own text
 * (search) and the log, which redacts itself.
 */
export async function runCli(main: (argv: string[]) => Promise<number>): Promise<never> {
  loadDotenv({ quiet: true });
  rememberSecrets(secretsOfSettings(process.env, process.argv.slice(2)));
  const writeStderr = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: unknown, ...rest: unknown[]) =>
    (writeStderr as (...args: unknown[]) => boolean)(
      typeof chunk === 'string' ? redactSecrets(chunk) : chunk,
      ...rest,
    )) as typeof process.stderr.write;
  let code: number;
  try {
    code = await main(process.argv.slice(2));
  } catch (error) {
    if (error instanceof PgembedError) {
      // An error may quote the database's text (a message's content): escaped.
      process.stderr.write(`pgembed: ${terminalSafe(oneLine(error))}\n`);
      code = error.exitCode;
    } else {
      process.stderr.write(
        `pgembed: unexpected error: ${terminalSafe(oneLine(error))} (LOG_LEVEL=debug shows the stack)\n`,
      );
      code = 1;
    }
    if (/^(debug|trace)$/.test(process.env.LOG_LEVEL ?? '') && error instanceof Error) {
      process.stderr.write(`${error.stack}\n`);
    }
  }
  // Exit now: an idle keep-alive socket must not hold a finished job open.
  process.exit(code);
}
