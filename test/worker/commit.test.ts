import { describe, expect, it } from 'vitest';
import { backends } from '../support/db.js';
import { makeRun, sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';
import { queryHook, rawSqlIncludes } from '../support/query-hook.js';

describe.each(backends())('where batches commit, on %s', (backend) => {
  const fx = useWorkerFixture(backend);

  // On PGlite the batch's transaction runs in the engine's own thread, so it
  // holds the one session for the engine's time alone, not for a round trip
  // through the worker's busy event loop per statement (BENCHMARKS.md, "The
  // hot path, fourth pass"). On a server it runs on the run's own pool.
  it(
    backend === 'pglite'
      ? "commits in the engine's thread: no fence statement through the run's handle"
      : "commits through the run's handle: one fence statement a batch",
    async () => {
      await seedMessages(fx.database.db, sampleTexts(12));
      let fences = 0;
      const counted = queryHook(rawSqlIncludes("|| '@' || q.xmin"), async (r) => {
        fences++;
        return r;
      });
      const { run } = makeRun(
        { ...fx.ctx(), db: fx.ctx().db.withPlugin(counted) },
        { 'batch-size': '4' },
      );
      const outcome = await run.run();
      expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 12, batches: 3 });
      const rows = await fx.database.db
        .selectFrom('embedding_batches')
        .select(['batch_no', 'embedded'])
        .orderBy('batch_no')
        .execute();
      expect(rows.map((r) => r.embedded)).toEqual([4, 4, 4]);
      expect(fences).toBe(backend === 'pglite' ? 0 : 3);
    },
  );
});
