import { afterAll, expect } from 'vitest';
import { openDatabaseHandles } from '../../src/db/connect.js';

// Runs after each test file: a pool or PGlite instance left open is a bug in
// the code under test or in the test, and would hang the run or leak memory.
afterAll(() => {
  expect(openDatabaseHandles(), 'database handles left open by this test file').toBe(0);
});
