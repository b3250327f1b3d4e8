import { Kysely } from 'kysely';
import type { BatchRecord } from '../sql/batches.js';
import type { ClaimScope } from '../sql/queue.js';
import type { Settlement } from '../sql/settle.js';
import {
  type CommitTarget,
  type Committed,
  commitBatch,
  commitTogether,
} from '../worker/commit.js';
import { type EmbeddingWriter, pgliteEmbeddingWriter } from './embedding-writer.js';
import type { EmbeddingColumnType } from './names.js';
import { PGliteDialect } from './pglite-dialect.js';
import type { PGliteEngine } from './pglite-engine.js';
import type { DB } from './schema.js';

/** A commit asked for, waiting its turn. */
interface Waiting {
  /** Commits of one run, writing alike, may go together. */
  key: string;
  to: CommitTarget;
  batch: BatchRecord | undefined;
  work: Settlement;
  resolve: (committed: Committed | undefined) => void;
  reject: (error: unknown) => void;
}

/**
 * Runs' batch commits, inside PGlite's thread (pglite-thread.ts), through a
 * Kysely handle of its own on the engine: the transaction's statements
 * follow each other there without a message between them. Loaded when a
 * run asks for its committer, so a command that commits no batch (status,
 * search) never loads the worker's commit code.
 *
 * Commits that arrive while one runs wait for it, then go together, a run's
 * in one transaction (commitTogether): at 4 batches in flight on one
 * session a commit waited 50-70 ms at the median for those before it.
 */
export function engineCommits(engine: PGliteEngine) {
  const db = new Kysely<DB>({ dialect: new PGliteDialect(engine) });
  // One writer per column type and id type: how vectors are written.
  const writers = new Map<string, EmbeddingWriter>();
  const copy = (into: string, data: Uint8Array) => engine.copyFrom(into, data);
  let waiting: Waiting[] = [];
  let draining = false;

  const alone = (one: Waiting) =>
    commitBatch(one.to, one.batch, one.work).then(one.resolve, one.reject);
  const settle = async (group: Waiting[]): Promise<void> => {
    const [first] = group;
    if (!first) return;
    if (group.length === 1 || !first.to.writer.afterSettle) {
      for (const one of group) await alone(one);
      return;
    }
    await commitTogether(first.to, group).then(
      (results) => {
        for (const [i, one] of group.entries()) one.resolve(results[i]);
      },
      // All or none: each alone now, so only a batch that fails by itself fails.
      async () => {
        for (const one of group) await alone(one);
      },
    );
  };

  // Started a turn of the event loop after the first commit arrives, so
  // every commit already sent is here; commits that arrive while a group
  // commits are the next group.
  const drain = async () => {
    try {
      while (waiting.length > 0) {
        const groups = new Map<string, Waiting[]>();
        for (const one of waiting) groups.set(one.key, [...(groups.get(one.key) ?? []), one]);
        waiting = [];
        for (const group of groups.values()) await settle(group);
      }
    } finally {
      draining = false;
    }
  };

  return {
    commit(
      columnType: EmbeddingColumnType,
      scope: ClaimScope,
      batch: BatchRecord | undefined,
      work: Settlement,
    ): Promise<Committed | undefined> {
      const key = `${columnType} ${scope.idType}`;
      let writer = writers.get(key);
      if (!writer) {
        writer = pgliteEmbeddingWriter(copy, columnType, scope.idType);
        writers.set(key, writer);
      }
      const to: CommitTarget = { db, scope, writer, overConnection: false };
      return new Promise((resolve, reject) => {
        waiting.push({
          key: `${key} ${scope.runId} ${scope.targetId}`,
          to,
          batch,
          work,
          resolve,
          reject,
        });
        if (!draining) {
          draining = true;
          setImmediate(drain);
        }
      });
    },
    close: () => db.destroy(),
  };
}
