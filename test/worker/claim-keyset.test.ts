import { describe, expect, it } from 'vitest';
import { readEmbeddingColumnType } from '../../src/db/embedding-column.js';
import { DEFAULT_SOURCE } from '../../src/db/names.js';
import { claimBatch } from '../../src/sql/queue.js';
import { ClaimKeyset } from '../../src/worker/claim-keyset.js';
import { backends, useMigratedDatabase } from '../support/db.js';
import { QueueFixture } from '../support/queue-fixture.js';

describe.each(backends())('the claim keyset over the queue on %s', (backend) => {
  const database = useMigratedDatabase(backend);

  it('finds a lower id that appears behind it while a stream of new ids goes on', async () => {
    const db = database().db;
    const f = new QueueFixture(
      db,
      await readEmbeddingColumnType(db),
      DEFAULT_SOURCE,
      'bigint',
      backend === 'pglite',
    );
    const scope = await f.scope({ provider: 'openai', model: 'keyset' });
    const insert = (id: number) => f.messages([[id, `message ${id}`]]);
    const keyset = new ClaimKeyset();
    const claim = async () => {
      const page = await claimBatch(db, scope, {
        after: keyset.after,
        limit: 2,
        ignoreBackoff: false,
      });
      const ids = page.map((m) => m.id);
      keyset.advance(ids, 2);
      return ids;
    };

    await insert(10);
    await insert(11);
    expect(await claim()).toEqual(['10', '11']);
    // Id 1 commits late, behind the keyset; a steady stream goes on above it,
    // one new row before each claim, so no claim ever comes back empty.
    await insert(1);
    const claimed: string[] = [];
    for (let next = 12; next < 22; next++) {
      await insert(next);
      claimed.push(...(await claim()));
    }
    // Found within two claims of it (the short page that ends the keyset,
    // then one from the first id), not when the stream stops.
    expect(claimed.indexOf('1')).toBeGreaterThanOrEqual(0);
    expect(claimed.indexOf('1')).toBeLessThanOrEqual(2);
    expect(new Set(claimed).size).toBe(claimed.length);
    expect(claimed.sort((a, b) => Number(a) - Number(b))).toEqual([
      '1',
      ...Array.from({ length: 10 }, (_, i) => String(12 + i)),
    ]);
  });

  it('moves past a full page and starts again after a short or empty one', () => {
    const keyset = new ClaimKeyset();
    expect(keyset.advance(['1', '2'], 2)).toBe(false);
    expect(keyset.after).toBe('2');
    expect(keyset.advance(['3'], 2)).toBe(false);
    expect(keyset.after).toBeNull();
    expect(keyset.advance(['4', '5'], 2)).toBe(false);
    // Empty after a moved keyset: claim again from the first id at once.
    expect(keyset.advance([], 2)).toBe(true);
    // Empty from the first id: nothing is pending.
    expect(keyset.advance([], 2)).toBe(false);
  });
});
