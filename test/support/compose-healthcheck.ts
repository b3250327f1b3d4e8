import { readFileSync } from 'node:fs';
import { parse } from 'yaml';

/**
 * The node script the compose `worker` service's healthcheck runs
 * (`node -e <script>`), as docker-compose.yml has it, so a test can run the
 * very command against a worker it started.
 */
export function workerHealthcheckScript(): string {
  const compose = parse(readFileSync(new URL('../../docker-compose.yml', import.meta.url), 'utf8'));
  const test = compose?.services?.worker?.healthcheck?.test as unknown;
  if (!Array.isArray(test) || test[0] !== 'CMD' || test[1] !== 'node' || test[2] !== '-e') {
    throw new Error('the worker healthcheck is not CMD node -e <script>');
  }
  return String(test[3]);
}
