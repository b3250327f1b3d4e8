import pino, { type DestinationStream, type Logger } from 'pino';
import { redactSecrets } from './redact.js';

export type { Logger };

/**
 * JSON lines on stdout (pretty on a terminal). Secrets are redacted by key
 * wherever they appear, and every finished line goes through redactSecrets:
 * URLs in any field (`base_url`, `database`, an `err` message or stack) lose
 * their user-info, query values and fragment, and the settings' known secrets
 * are replaced wherever they appear.
 */
export function createLogger(
  level: string,
  options: { pretty?: boolean; destination?: DestinationStream } = {},
): Logger {
  const pretty = options.pretty ?? process.stdout.isTTY === true;
  return pino(
    {
      level,
      base: { pid: process.pid },
      redact: {
        paths: [
          'apiKey',
          'openaiApiKey',
          '*.apiKey',
          '*.openaiApiKey',
          'password',
          '*.password',
          'headers.authorization',
          '*.headers.authorization',
        ],
        censor: '[redacted]',
      },
      hooks: { streamWrite: (line) => redactSecrets(line, undefined, { json: true }) },
    },
    options.destination ??
      (pretty
        ? pino.transport({ target: 'pino-pretty', options: { destination: 1 } })
        : // Synchronous, so the last lines before process.exit are not lost.
          pino.destination({ dest: 1, sync: true })),
  );
}
