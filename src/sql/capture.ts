import { createHash } from 'node:crypto';
import { type Kysely, sql } from 'kysely';
import type { MessageSource } from '../db/names.js';
import { quotedSource } from '../db/source.js';
import { ConfigError } from '../errors.js';

/** How a source's changes reach the queue. */
export type CaptureMode = 'triggers' | 'reconcile';

/**
 * The capture functions' version: a pgembed whose triggers do something new
 * bumps it, and registerSource replaces an older database's functions.
 */
const CAPTURE_VERSION = 1;

/** The channel the capture triggers notify; the payload is pgembed's schema. */
export const WAKE_CHANNEL = 'pgembed_changes';

// Relations that can carry row triggers with transition tables.
const TRIGGER_KINDS = new Set(['r', 'p']);

export interface RegisteredSource {
  capture: CaptureMode;
  /** The capture mode changed (or the source is new): its targets must reconcile. */
  changed: boolean;
}

/**
 * Registers the source this schema's embeddings belong to and puts its
 * change capture in place: statement-level triggers on a table (unless
 * `triggers` is false), reconciliation scans for a view or without them.
 * One source per schema: its ids key every embedding, so a second source
 * with ids of its own would overwrite the first's. Idempotent and cheap
 * when nothing changes: one read of `embedding_sources`, and with triggers
 * one of the catalog, to find them still in place (they are put back, and
 * the targets scan, if they went missing).
 */
export async function registerSource<T>(
  db: Kysely<T>,
  source: MessageSource,
  options: { triggers: boolean },
): Promise<RegisteredSource> {
  return db.transaction().execute(async (trx) => {
    // Two processes starting at once register once.
    await sql`select pg_advisory_xact_lock(hashtextextended('pgembed capture', 0))`.execute(trx);
    const { rows } = await sql<{
      relation: string;
      idColumn: string;
      textColumn: string;
      capture: CaptureMode;
      version: number;
    }>`select relation, id_column as "idColumn", text_column as "textColumn", capture,
         capture_version as version
       from embedding_sources`.execute(trx);
    const registered = rows[0];
    if (
      registered &&
      (registered.relation !== source.table ||
        registered.idColumn !== source.idColumn ||
        registered.textColumn !== source.textColumn)
    ) {
      throw new ConfigError(
        `this schema's embeddings belong to --source ${registered.relation} (--id-column ${registered.idColumn}, --text-column ${registered.textColumn}); one schema holds one source, whose ids key its embeddings: embed ${source.table} in a schema of its own (give DATABASE_URL the query parameter options set to -csearch_path=other)`,
      );
    }
    const { rows: kind } = await sql<{ relkind: string }>`
      select relkind::text as relkind from pg_class
      where oid = to_regclass(${quotedSource(source)})`.execute(trx);
    const capture: CaptureMode =
      options.triggers && TRIGGER_KINDS.has(kind[0]?.relkind ?? '') ? 'triggers' : 'reconcile';
    // Triggers can go missing behind our back (the table dropped and made
    // again, a restore of the table alone): then changes are being missed,
    // so they are put back and the targets scan.
    const inPlace =
      registered?.capture === capture &&
      (capture === 'reconcile' || (await captureTriggers(trx, source)).length === TRIGGERS.length);
    if (inPlace && registered?.version === CAPTURE_VERSION) return { capture, changed: false };

    if (capture === 'triggers') await installTriggers(trx, source);
    else await dropTriggers(trx, source);
    await sql`
      insert into embedding_sources (relation, id_column, text_column, capture, capture_version)
      values (${source.table}, ${source.idColumn}, ${source.textColumn}, ${capture},
              ${CAPTURE_VERSION})
      on conflict (id) do update set capture = excluded.capture,
        capture_version = excluded.capture_version, registered_at = now()`.execute(trx);
    // Only the functions of an older pgembed were replaced: nothing was missed.
    if (inPlace) return { capture, changed: false };
    // Changes made while nothing captured them are unknown: every target scans.
    await sql`update embedding_targets set backfilled_at = null`.execute(trx);
    return { capture, changed: true };
  });
}

/** The registered capture mode, or undefined before any source is registered. */
export async function captureMode<T>(db: Kysely<T>): Promise<CaptureMode | undefined> {
  const { rows } = await sql<{ capture: CaptureMode }>`
    select capture from embedding_sources`.execute(db);
  return rows[0]?.capture;
}

const TRIGGERS = ['insert', 'update', 'delete', 'truncate'] as const;

/**
 * This schema's capture triggers on the source: those that call its
 * functions. Another pgembed schema may capture the same table with
 * triggers of its own, which are left alone.
 */
async function captureTriggers<T>(db: Kysely<T>, source: MessageSource): Promise<string[]> {
  const { rows } = await sql<{ name: string }>`
    select t.tgname::text as name from pg_trigger t join pg_proc p on p.oid = t.tgfoid
    where t.tgrelid = to_regclass(${quotedSource(source)}) and not t.tgisinternal
      and p.pronamespace = (select oid from pg_namespace where nspname = current_schema())
      and p.proname::text in ('pgembed_capture_insert', 'pgembed_capture_update',
                              'pgembed_capture_delete', 'pgembed_capture_truncate')`.execute(db);
  return rows.map((r) => r.name);
}

async function dropTriggers<T>(db: Kysely<T>, source: MessageSource): Promise<void> {
  const table = sql.raw(quotedSource(source));
  for (const name of await captureTriggers(db, source)) {
    await sql`drop trigger if exists ${sql.id(name)} on ${table}`.execute(db);
  }
}

/**
 * The trigger's name on the source: with the schema in it, since trigger
 * names are per table and two pgembed schemas may capture one table (its
 * title and its body, say). A name too long for an identifier ends in a
 * hash of the schema instead.
 */
function captureTriggerName(op: string, schema: string): string {
  const name = `pgembed_capture_${op}_${schema}`;
  if (Buffer.byteLength(name) <= 63) return name;
  return `pgembed_capture_${op}_${createHash('sha256').update(schema).digest('hex').slice(0, 16)}`;
}

/**
 * Four statement-level triggers with transition tables: one statement that
 * writes 100,000 rows runs each once, not 100,000 times. What they cost the
 * application (BENCHMARKS.md, one target, PostgreSQL 15): a 100k-row insert
 * took 0.45–0.48 s bare and 2.3–2.6 s with them, most of it the queue rows'
 * ON CONFLICT insert into a table with three indexes; single-row inserts
 * from 4 connections went from 4,451 to 3,011 a second (−32%).
 * - insert: enqueue the new ids for every target;
 * - update: enqueue only ids whose text changed (an update that leaves the
 *   text as it was costs nothing); an id changed by the update is a delete
 *   of the old id;
 * - delete: drop the ids' queue rows, then their embeddings for every model.
 *   The queue rows first: a worker committing an embedding of one of them
 *   holds its queue row locked, so the delete waits for that commit and the
 *   embedding delete that follows sees (and removes) what it wrote;
 * - truncate: drop the source's queue and embeddings.
 * Each wakes listening workers with one NOTIFY, but only when no older
 * change is waiting: a worker busy with a backlog claims again without being
 * told, and an unconditional NOTIFY serialises the application's commits
 * (measured: 343–396 single-row inserts a second with it, 2,065–4,445
 * without). The functions run with pgembed's schema as their search_path,
 * whatever the writing application's is.
 */
async function installTriggers<T>(db: Kysely<T>, source: MessageSource): Promise<void> {
  const { rows } = await sql<{ schema: string }>`select current_schema() as schema`.execute(db);
  const schema = rows[0]?.schema;
  if (!schema) throw new ConfigError('no current schema to install the capture triggers in');
  const s = quoteIdent(schema);
  const id = quoteIdent(source.idColumn);
  const text = quoteIdent(source.textColumn);
  const table = quotedSource(source);
  const fn = (op: string) => `${s}.pgembed_capture_${op}`;
  const header = (op: string) =>
    `create or replace function ${fn(op)}() returns trigger language plpgsql
     security definer set search_path = ${s}, pg_catalog as $pgembed$`;
  const wake = `
    if exists (select 1 from embedding_targets t
               where not exists (select 1 from embedding_queue q
                                 where q.target_id = t.id and q.claimed_by is null
                                   and q.not_before is null and q.changed_at < now())) then
      perform pg_notify('${WAKE_CHANNEL}', ${quoteLiteral(schema)});
    end if;`;
  const enqueue = (rowsSql: string) => `
    insert into embedding_queue as q (target_id, message_id)
    select t.id, c.id from (${rowsSql}) c cross join embedding_targets t
    on conflict (target_id, message_id) do update
      set not_before = null, attempts = 0, last_error = null, force = false;`;

  await sql
    .raw(`${header('insert')}
    begin
      ${enqueue(`select n.${id} as id from new_rows n where n.${id} is not null`)}
      if found then ${wake} end if;
      return null;
    end $pgembed$`)
    .execute(db);
  await sql
    .raw(`${header('update')}
    begin
      -- An id the update took away is a deleted message.
      delete from embedding_queue q using old_rows o
      where q.message_id = o.${id} and not exists (select 1 from new_rows n where n.${id} = o.${id});
      delete from message_embeddings e using old_rows o
      where e.message_id = o.${id} and not exists (select 1 from new_rows n where n.${id} = o.${id});
      ${enqueue(`select n.${id} as id from new_rows n left join old_rows o on o.${id} = n.${id}
                 where n.${id} is not null and (o.${id} is null or o.${text} is distinct from n.${text})`)}
      if found then ${wake} end if;
      return null;
    end $pgembed$`)
    .execute(db);
  await sql
    .raw(`${header('delete')}
    begin
      delete from embedding_queue q using old_rows o where q.message_id = o.${id};
      delete from message_embeddings e using old_rows o where e.message_id = o.${id};
      return null;
    end $pgembed$`)
    .execute(db);
  await sql
    .raw(`${header('truncate')}
    begin
      delete from embedding_queue;
      delete from message_embeddings;
      return null;
    end $pgembed$`)
    .execute(db);

  await dropTriggers(db, source);
  for (const [op, transition] of [
    ['insert', 'referencing new table as new_rows'],
    ['update', 'referencing old table as old_rows new table as new_rows'],
    ['delete', 'referencing old table as old_rows'],
  ] as const) {
    await sql
      .raw(`create trigger ${quoteIdent(captureTriggerName(op, schema))} after ${op} on ${table}
            ${transition} for each statement execute function ${fn(op)}()`)
      .execute(db);
  }
  await sql
    .raw(`create trigger ${quoteIdent(captureTriggerName('truncate', schema))} after truncate
          on ${table} for each statement execute function ${fn('truncate')}()`)
    .execute(db);
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

function quoteLiteral(value: string): string {
  return `'${value.replaceAll("'", "''")}'`;
}
