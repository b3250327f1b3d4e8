import { describe, expect, it } from 'vitest';
import { DEFAULT_SOURCE } from '../../src/db/source.js';
import { createLogger } from '../../src/log.js';
import { openSweep } from '../../src/sql/ranges.js';
import { insertRun } from '../../src/sql/runs.js';
import { RangeLeases } from '../../src/worker/range-leases.js';
import { backends } from '../support/db.js';
import { sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';

const TARGET = {
  provider: 'openai',
  model: 'text-embedding-3-small',
  force: false,
  source: DEFAULT_SOURCE,
};

describe.each(backends())('the ranges a run holds on %s', (backend) => {
  const fx = useWorkerFixture(backend);

  it('takes back a range it gave up as lost while the lease is still its own, and never ends with it unwalked', async () => {
    await seedMessages(fx.database.db, sampleTexts(6));
    const runId = await insertRun(fx.database.db, {
      ...TARGET,
      options: {},
      planned: 6,
      blank: 0,
    });
    const sweep = await openSweep(fx.database.db, TARGET, { rangeSize: 100, runId });
    const leases = new RangeLeases({
      db: fx.database.db,
      sweepId: sweep.id,
      runId,
      leaseMs: 60_000,
      log: createLogger('silent'),
      dbRetry: (_what, fn) => fn(),
      abortSignal: new AbortController().signal,
      ended: () => false,
    });
    const first = await leases.next();
    expect(first?.key.rangeNo).toBe(0);
    // A wrong verdict of "lost" (the renewal raced a claim, say): the sweep's
    // only range is still leased to this run, so the run must not end.
    if (first) first.lost = true;
    const again = await leases.next();
    expect(again?.key.rangeNo).toBe(0);
    expect(again).not.toBe(first);
    await leases.releaseAll();
  });
});
