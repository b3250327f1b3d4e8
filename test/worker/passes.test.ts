import { sql } from 'kysely';
import { describe, expect, it } from 'vitest';
import type { FlagValues } from '../../src/config.js';
import { backends } from '../support/db.js';
import { makeRun, sampleTexts, seedMessages, useWorkerFixture } from '../support/embed-run.js';

describe.each(backends())('resuming a shared sweep on %s', (backend) => {
  const fx = useWorkerFixture(backend);
  const embed = (flags: FlagValues) => makeRun(fx.ctx(), flags).run.run();
  const unhandled = async () =>
    (
      await sql<{ id: string }>`
        select m.id::text as id from messages m
        where m.content ~ '\\S'
          and not exists (select 1 from message_embeddings e where e.message_id = m.id
                          and e.content_sha256 = sha256(convert_to(m.content, 'UTF8')))
          and not exists (select 1 from embedding_skips s where s.message_id = m.id)
        order by m.id`.execute(fx.database.db)
    ).rows.map((r) => r.id);

  it('re-embeds a message edited behind the cursor of the sweep it joins, in a second pass', async () => {
    await seedMessages(fx.database.db, sampleTexts(10));
    // Run 1 walks part of the only range and hands it back.
    expect((await embed({ limit: '6' })).summary.embedded).toBe(6);
    await sql`update messages set content = 'an edited first message' where id = 1`.execute(
      fx.database.db,
    );
    fx.fake.reset();
    const outcome = await embed({});
    expect(outcome.summary).toMatchObject({ status: 'succeeded', embedded: 5 });
    expect(await unhandled()).toEqual([]);
    expect(fx.fake.stats.seen.get('an edited first message')).toBe(1);
    // Each batch of both passes has its own row: none was taken for an earlier one.
    const batches = await sql<{ n: number; embedded: number }>`
      select count(*)::int as n, sum(embedded)::int as embedded from embedding_batches
      where run_id = ${outcome.summary.runId}`.execute(fx.database.db);
    expect(batches.rows[0]).toEqual({ n: outcome.summary.batches, embedded: 5 });
  });

  it('resumes at the message a strict run stopped on, even when later batches had committed', async () => {
    const contents = sampleTexts(16);
    contents[1] = 'POISON two';
    await seedMessages(fx.database.db, contents);
    fx.fake.failWhenInputContains('POISON', {
      kind: 'status',
      status: 400,
      body: { error: { message: 'invalid input', type: 'invalid_request_error' } },
    });
    fx.fake.options.latencyMs = 30;
    const strict = await embed({ concurrency: '2' });
    expect(strict.summary.status).toBe('failed');
    const cursor = await sql<{ cursor: string | null }>`
      select cursor_id::text as cursor from embedding_ranges`.execute(fx.database.db);
    expect(cursor.rows[0]?.cursor).toBe('1');
    const partial = await embed({ 'allow-partial': true });
    expect(partial.summary.status).toBe('partial');
    expect(partial.summary.skipped).toBe(1);
    expect(await unhandled()).toEqual([]);
  });

  it('sends nothing twice when a --force run joins a --force sweep in progress', async () => {
    await seedMessages(fx.database.db, sampleTexts(12));
    await embed({});
    fx.fake.reset();
    await embed({ force: true, limit: '5' });
    await embed({ force: true });
    expect(fx.fake.stats.seen.size).toBe(12);
    expect([...fx.fake.stats.seen.values()].every((n) => n === 1)).toBe(true);
  });
});
