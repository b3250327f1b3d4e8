import pino, { type Logger } from 'pino';

export type { Logger };

/**
 * JSON lines on stdout (pretty on a terminal). Secrets are redacted by key
 * wherever they appear, and URLs are logged through redactUrl.
 */
export function createLogger(level: string, options: { pretty?: boolean } = {}): Logger {
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
    },
    pretty
      ? pino.transport({ target: 'pino-pretty', options: { destination: 1 } })
      : // Synchronous, so the last lines before process.exit are not lost.
        pino.destination({ dest: 1, sync: true }),
  );
}
