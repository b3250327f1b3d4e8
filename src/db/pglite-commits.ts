import { Kysely } from 'kysely';
import type { BatchRecord } from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import type { Settlement } from '../sql/settle.js';
import { type BatchCommitter, type Committed, localCommitter } from '../worker/commit.js';
import { pgliteEmbeddingWriter } from './embedding-writer.js';
import type { EmbeddingColumnType } from './names.js';
import { PGliteDialect } from './pglite-dialect.js';
import type { PGliteEngine } from './pglite-engine.js';
import type { DB } from './schema.js';

/**
 * Runs' batch commits, inside PGlite's thread (pglite-thread.ts), through a
 * Kysely handle of its own on the engine: the transaction's statements
 * follow each other there without a message between them. Loaded when a
 * run asks for its committer, so a command that commits no batch (status,
 * search) never loads the worker's commit code.
 */
export function engineCommits(engine: PGliteEngine) {
  const db = new Kysely<DB>({ dialect: new PGliteDialect(engine) });
  // One committer per column type and id type: how vectors are written.
  const committers = new Map<string, BatchCommitter>();
  return {
    commit(
      columnType: EmbeddingColumnType,
      scope: ClaimScope,
      batch: BatchRecord | undefined,
      work: Settlement,
    ): Promise<Committed | undefined> {
      const key = `${columnType} ${scope.idType}`;
      let committer = committers.get(key);
      if (!committer) {
        const copy = (into: string, data: Uint8Array) => engine.copyFrom(into, data);
        committer = localCommitter(pgliteEmbeddingWriter(copy, columnType, scope.idType), {
          overConnection: false,
        });
        committers.set(key, committer);
      }
      return committer.commit(db, scope, batch, work);
    },
    close: () => db.destroy(),
  };
}
