/**
 * A writing application, for the continuous-sync tests: a seeded stream of
 * small transactions against `messages(id, content)` while `embed --watch`
 * workers run. Spawned as its own process:
 *
 *   DATABASE_URL=… WRITER_SEED=42 WRITER_TRANSACTIONS=300 node --import tsx test/support/writer.ts
 *
 * Inserts (one to three rows a statement, some blank), text edits (one row,
 * or several in one statement), edits that leave the text as it was (`set
 * role = …`, `set content = content`), deletes, and transactions rolled
 * back. Every text it writes is new (never written before, by it or by a
 * writer with another WRITER_TAG), so a text the provider saw twice was sent
 * twice. Ids are never reused: new rows take WRITER_FIRST_ID (default 1)
 * and up. With WRITER_PAUSE_AT=k it prints {"event":"paused"} before its k-th
 * transaction and goes on when a line arrives on stdin. Its last stdout line
 * is the JSON of what it did (see WriterReport). A DATABASE_URL of a PGlite
 * directory that another process holds reaches it through that holder's
 * socket, as openDatabase does for any second process.
 */
import { createInterface } from 'node:readline';
import { pathToFileURL } from 'node:url';
import { sql } from 'kysely';
import { openDatabase } from '../../src/db/connect.js';
import { mulberry32 } from './seeded.js';

export interface WriterReport {
  event: 'done';
  seed: number;
  transactions: number;
  committed: number;
  rolledBack: number;
  inserted: number;
  edited: number;
  /** Statements that touched a row without changing its text. */
  unchangedEdits: number;
  deleted: number;
  /** The messages as the writer left them: id → content. */
  live: Record<string, string>;
  /** Ids it deleted (and never wrote again: ids are never reused). */
  deletedIds: string[];
  /** Texts that were a row's current text when an unchanged-text edit touched it. */
  unchangedTexts: string[];
  /** Texts only ever written in transactions that rolled back (or failed). */
  rolledBackTexts: string[];
  /** What each committed transaction did to each id, in order: for explaining a failure. */
  history: Record<string, string[]>;
  /** Transactions the database refused (rolled back, not retried): none are expected. */
  failed: Array<{ transaction: number; code: string; message: string; detail: string | undefined }>;
}

const BLANKS = ['', '   ', '\n\t '];

function intEnv(name: string, fallback?: number): number {
  const raw = process.env[name];
  if (raw === undefined || raw === '') {
    if (fallback === undefined) throw new Error(`${name} is required`);
    return fallback;
  }
  const n = Number(raw);
  if (!Number.isSafeInteger(n)) throw new Error(`${name} must be an integer, not ${raw}`);
  return n;
}

async function main(): Promise<void> {
  const url = process.env.DATABASE_URL;
  if (!url) throw new Error('DATABASE_URL is required');
  const seed = intEnv('WRITER_SEED');
  const transactions = intEnv('WRITER_TRANSACTIONS');
  const pauseAt = intEnv('WRITER_PAUSE_AT', -1);
  let nextId = intEnv('WRITER_FIRST_ID', 1);
  const tag = process.env.WRITER_TAG || `w${seed}`;
  const random = mulberry32(seed);
  const pick = <T>(items: readonly T[]): T => items[Math.floor(random() * items.length)] as T;
  const chance = (p: number) => random() < p;

  let textNo = 0;
  const words = ['alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot', 'golf', 'hotel'];
  /** A text never written before; one in twelve is blank (blanks repeat, but are never sent). */
  const newText = (): string => {
    if (chance(1 / 12)) return pick(BLANKS);
    textNo++;
    const extra = Array.from({ length: Math.floor(random() * 6) }, () => pick(words)).join(' ');
    return `${tag} text ${textNo}: ${extra}`.trimEnd();
  };

  const database = await openDatabase(url, { poolMax: 2, command: 'writer' });
  const db = database.db;
  const live = new Map<string, string>();
  const deletedIds: string[] = [];
  const unchangedTexts = new Set<string>();
  const rolledBackTexts: string[] = [];
  const history: Record<string, string[]> = {};
  const failed: WriterReport['failed'] = [];
  const report = {
    committed: 0,
    rolledBack: 0,
    inserted: 0,
    edited: 0,
    unchangedEdits: 0,
    deleted: 0,
  };
  const liveIds = () => [...live.keys()];

  class Rollback extends Error {}

  try {
    for (let t = 0; t < transactions; t++) {
      if (t === pauseAt) {
        process.stdout.write(`${JSON.stringify({ event: 'paused', at: t })}\n`);
        await nextStdinLine();
      }
      const rollback = chance(0.05);
      // The transaction's effects, applied to `live` only once it commits.
      const staged = new Map<string, string | null>();
      const counts = { inserted: 0, edited: 0, unchangedEdits: 0, deleted: 0 };
      const touchedUnchanged: string[] = [];
      const written: string[] = [];
      const log: Array<[string, string]> = [];
      const current = (id: string) => (staged.has(id) ? staged.get(id) : live.get(id));
      const candidates = () => [
        ...new Set([...liveIds(), ...staged.keys()].filter((id) => current(id) != null)),
      ];
      try {
        await db.transaction().execute(async (trx) => {
          // Durability is not under test: no fsync wait per small transaction.
          await sql`set local synchronous_commit = off`.execute(trx);
          const statements = 1 + Math.floor(random() * 3);
          for (let s = 0; s < statements; s++) {
            const ids = candidates();
            const roll = random();
            if (roll < 0.4 || ids.length < 4) {
              const rows = Array.from({ length: 1 + Math.floor(random() * 3) }, () => ({
                id: String(nextId++),
                content: newText(),
              }));
              await trx.insertInto('messages').values(rows).execute();
              for (const row of rows) {
                staged.set(row.id, row.content);
                written.push(row.content);
                log.push([row.id, `insert ${JSON.stringify(row.content)}`]);
              }
              counts.inserted += rows.length;
            } else if (roll < 0.6) {
              const id = pick(ids);
              const content = newText();
              await trx.updateTable('messages').set({ content }).where('id', '=', id).execute();
              staged.set(id, content);
              written.push(content);
              log.push([id, `edit ${JSON.stringify(content)}`]);
              counts.edited++;
            } else if (roll < 0.67) {
              // Several rows' texts in one statement.
              const chosen = [...new Set([pick(ids), pick(ids), pick(ids)])];
              const rows = chosen.map((id) => ({ id, content: newText() }));
              await sql`update messages m set content = v.content
                from (values ${sql.join(rows.map((r) => sql`(${r.id}::bigint, ${r.content})`))})
                  as v (id, content)
                where m.id = v.id`.execute(trx);
              for (const row of rows) {
                staged.set(row.id, row.content);
                written.push(row.content);
                log.push([row.id, `edit (of ${rows.length}) ${JSON.stringify(row.content)}`]);
              }
              counts.edited += rows.length;
            } else if (roll < 0.82) {
              // An edit that leaves the text as it was: nothing to embed.
              const id = pick(ids);
              const role = chance(0.5);
              log.push([id, role ? 'set role' : 'set content = content']);
              if (role) {
                await trx
                  .updateTable('messages')
                  .set({ role: `role ${t}.${s}`, updated_at: sql`now()` })
                  .where('id', '=', id)
                  .execute();
              } else {
                await sql`update messages set content = content where id = ${id}`.execute(trx);
              }
              touchedUnchanged.push(current(id) as string);
              counts.unchangedEdits++;
            } else {
              const chosen = [...new Set([pick(ids), ...(chance(0.3) ? [pick(ids)] : [])])];
              await trx.deleteFrom('messages').where('id', 'in', chosen).execute();
              for (const id of chosen) {
                staged.set(id, null);
                log.push([id, 'delete']);
              }
              counts.deleted += chosen.length;
            }
          }
          if (rollback) throw new Rollback();
        });
      } catch (error) {
        if (!(error instanceof Rollback)) {
          // A transaction the database refused (a deadlock, say) is kept
          // account of and the stream goes on: the test says what it was.
          const e = error as { code?: string; message?: string; detail?: string };
          if (!e.code) throw error;
          failed.push({ transaction: t, code: e.code, message: e.message ?? '', detail: e.detail });
        } else {
          report.rolledBack++;
        }
        rolledBackTexts.push(...written.filter((text) => /\S/.test(text)));
        continue;
      }
      report.committed++;
      for (const [id, what] of log) {
        history[id] ??= [];
        history[id].push(`t${t} ${what}`);
      }
      for (const [id, content] of staged) {
        if (content === null) {
          // Deleted, or inserted and deleted in one transaction (seen by no one).
          live.delete(id);
          deletedIds.push(id);
        } else {
          live.set(id, content);
        }
      }
      for (const text of touchedUnchanged) if (/\S/.test(text)) unchangedTexts.add(text);
      report.inserted += counts.inserted;
      report.edited += counts.edited;
      report.unchangedEdits += counts.unchangedEdits;
      report.deleted += counts.deleted;
    }
  } finally {
    await database.close();
  }
  const done: WriterReport = {
    event: 'done',
    seed,
    transactions,
    ...report,
    live: Object.fromEntries(live),
    deletedIds,
    unchangedTexts: [...unchangedTexts],
    rolledBackTexts,
    history,
    failed,
  };
  process.stdout.write(`${JSON.stringify(done)}\n`);
}

let lines: AsyncIterator<string> | undefined;
async function nextStdinLine(): Promise<void> {
  lines ??= createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  const next = await lines.next();
  if (next.done) throw new Error('stdin closed while the writer was paused');
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main().then(
    () => process.exit(0),
    (error: unknown) => {
      process.stderr.write(`writer: ${error instanceof Error ? error.stack : String(error)}\n`);
      process.exit(1);
    },
  );
}
