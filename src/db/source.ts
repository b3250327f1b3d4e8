import { type Kysely, sql } from 'kysely';
import { ConfigError } from '../errors.js';
import type { IdType, MessageSource } from './names.js';

function tableRef(source: MessageSource) {
  return sql.id(...source.table.split('.'));
}

/**
 * The source as `m(id, content)` for every query: a plain subquery, which
 * Postgres inlines, so `m.id > $1 order by m.id` still walks the id index.
 * A row whose id is NULL is not a message: it can be neither paged nor keyed.
 * A table's id is NOT NULL (inspectSource refuses one that is not); a view's
 * NULL ids are left out here, so every count and read agrees on what a
 * message is.
 */
export function sourceRelation(source: MessageSource) {
  const id = sql.id(source.idColumn);
  return sql`(select ${id} as id, ${sql.id(source.textColumn)} as content
              from ${tableRef(source)} where ${id} is not null)`;
}

const INTEGER_TYPES = new Set(['bigint', 'integer', 'smallint']);
const TEXT_TYPE = /^(text|character varying|character|varchar|char)\b/;
// Relations that carry constraints: a table, a partitioned table.
const TABLE_KINDS = new Set(['r', 'p']);

/** The source's name quoted for SQL text and to_regclass(): `"schema"."table"`. */
export function quotedSource(source: MessageSource): string {
  return source.table
    .split('.')
    .map((p) => `"${p}"`)
    .join('.');
}

// A unique index that proves the column unique on its own: valid, not
// partial, one key column and that column (a primary key or unique
// constraint is one).
function uniqueIndexOn(relation: 'c.oid' | 'a.attrelid', attnum: 'a.attnum') {
  return sql<boolean>`exists (select 1 from pg_index i
    where i.indrelid = ${sql.raw(relation)} and i.indisunique and i.indisvalid
      and i.indpred is null and i.indnkeyatts = 1 and i.indkey[0] = ${sql.raw(attnum)})`;
}

/**
 * Refuses, before any work, a source that is not an existing table or view
 * with those columns of usable types, or a table whose id column is not
 * unique and NOT NULL (a primary key, or a unique constraint or index on it
 * alone and NOT NULL): the ids are the keyset and the embeddings' key.
 * A view has no constraints to inspect; its NULL ids are left out (see
 * sourceRelation) and a duplicate id stops the run at the page that meets it
 * (see assertUniqueIds). Returns the id type.
 */
export async function inspectSource<T>(db: Kysely<T>, source: MessageSource): Promise<IdType> {
  const { rows } = await sql<{
    relkind: string | null;
    column: string | null;
    type: string | null;
    notNull: boolean | null;
    unique: boolean | null;
  }>`
    select c.relkind::text as relkind, a.attname::text as column,
           format_type(a.atttypid, a.atttypmod) as type, a.attnotnull as "notNull",
           ${uniqueIndexOn('c.oid', 'a.attnum')} as unique
    from pg_class c
    left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
    where c.oid = to_regclass(${quotedSource(source)})`.execute(db);
  const where = `--source ${source.table}`;
  if (rows.length === 0) {
    throw new ConfigError(`${where}: no such table or view (names are case-sensitive as given)`);
  }
  const relkind = rows[0]?.relkind ?? '';
  if (!['r', 'v', 'm', 'p', 'f'].includes(relkind)) {
    throw new ConfigError(`${where} is not a table or view`);
  }
  const columnOf = (name: string) => rows.find((r) => r.column === name);
  const id = columnOf(source.idColumn);
  const textType = columnOf(source.textColumn)?.type;
  if (!id?.type) throw new ConfigError(`${where} has no column '${source.idColumn}' (--id-column)`);
  if (!textType) {
    throw new ConfigError(`${where} has no column '${source.textColumn}' (--text-column)`);
  }
  if (!TEXT_TYPE.test(textType)) {
    throw new ConfigError(
      `--text-column ${source.textColumn} is ${textType}; it must be text or varchar`,
    );
  }
  const idType = id.type === 'uuid' ? 'uuid' : INTEGER_TYPES.has(id.type) ? 'bigint' : undefined;
  if (!idType) {
    throw new ConfigError(
      `--id-column ${source.idColumn} is ${id.type}; ids must be an integer type or uuid`,
    );
  }
  if (TABLE_KINDS.has(relkind)) {
    if (!id.unique) {
      throw new ConfigError(
        `--id-column ${source.idColumn} of ${source.table} is not declared unique: give it a primary key, or a unique constraint (or unique index on it alone) and NOT NULL; the ids are the keyset and the embeddings' key`,
      );
    }
    if (!id.notNull) {
      throw new ConfigError(
        `--id-column ${source.idColumn} of ${source.table} allows NULL: declare it NOT NULL (a primary key is); a NULL id can be neither paged nor keyed`,
      );
    }
  }
  return idType;
}

// Per database handle: whether a source's ids are proven unique by the
// catalog, so the read path checks pages of the others (views) only. NULL
// ids are never read (see sourceRelation), so a unique index is the proof.
const provenUnique = new WeakMap<object, Map<string, Promise<boolean>>>();

function idsProvenUnique<T>(db: Kysely<T>, source: MessageSource): Promise<boolean> {
  const known = provenUnique.get(db) ?? new Map<string, Promise<boolean>>();
  provenUnique.set(db, known);
  const key = `${source.table}\u0000${source.idColumn}`;
  let answer = known.get(key);
  if (!answer) {
    answer = sql<{ unique: boolean }>`
      select ${uniqueIndexOn('a.attrelid', 'a.attnum')} as unique
      from pg_attribute a
      where a.attrelid = to_regclass(${quotedSource(source)}) and a.attname = ${source.idColumn}
        and not a.attisdropped`
      .execute(db)
      .then(({ rows }) => rows[0]?.unique === true);
    // A failed look-up (a lost connection) is asked again next time.
    answer.catch(() => known.delete(key));
    known.set(key, answer);
  }
  return answer;
}

/**
 * Refuses a source (a view, or anything the catalog cannot vouch for) that
 * holds an id more than once between `first` and `last`, the first and last
 * ids of a page just read, counting every row, eligible or not: a page with
 * a repeated id would fail its upsert, and a copy at a page's edge would be
 * stepped over by the keyset. The pages' spans do not overlap: where the
 * view's table has an index on the id, the checks add up to one more walk
 * over the ids a run reads; without one, each check scans the view, as each
 * page read already does. A source with a unique index on the id (a table
 * that inspectSource accepted) costs one catalog look-up per database handle.
 */
export async function assertUniqueIds<T>(
  db: Kysely<T>,
  source: MessageSource,
  first: string,
  last: string,
): Promise<void> {
  if (await idsProvenUnique(db, source)) return;
  const { rows } = await sql<{ id: string; copies: number }>`
    select m.id::text as id, count(*)::int as copies from ${sourceRelation(source)} m
    where m.id >= ${first} and m.id <= ${last}
    group by m.id having count(*) > 1
    order by m.id limit 1`.execute(db);
  const repeated = rows[0];
  if (repeated) throw duplicateIdError(source, repeated.id, repeated.copies);
}

/** The one line for a source (a view) that returns an id more than once. */
export function duplicateIdError(source: MessageSource, id: string, copies: number): ConfigError {
  return new ConfigError(
    `--source ${source.table} has ${copies} rows with ${source.idColumn} ${id}: ids must be unique (they key the embeddings); make it return each id once`,
  );
}

/**
 * The first id after `after` that the source returns more than once, if any:
 * asked only once a statement has failed on one (a view; a table's ids are
 * unique by its constraint).
 */
export async function firstDuplicateId<T>(
  db: Kysely<T>,
  source: MessageSource,
  after: string | null,
): Promise<ConfigError | undefined> {
  const from = after === null ? sql`true` : sql`m.id > ${after}`;
  const { rows } = await sql<{ id: string; copies: number }>`
    select m.id::text as id, count(*)::int as copies from ${sourceRelation(source)} m
    where ${from} group by m.id having count(*) > 1 order by m.id limit 1`.execute(db);
  const repeated = rows[0];
  return repeated && duplicateIdError(source, repeated.id, repeated.copies);
}

/** The id type the embeddings tables were created with. */
export async function readIdType<T>(db: Kysely<T>): Promise<IdType> {
  const { rows } = await sql<{ type: string }>`
    select format_type(atttypid, atttypmod) as type from pg_attribute
    where attrelid = to_regclass('message_embeddings') and attname = 'message_id'`.execute(db);
  return rows[0]?.type === 'uuid' ? 'uuid' : 'bigint';
}

/** Orders ids as Postgres does: numerically for bigint, as text for uuid (lowercase hex). */
export function compareIds(a: string, b: string): number {
  if (/^-?\d+$/.test(a) && /^-?\d+$/.test(b)) {
    const x = BigInt(a);
    const y = BigInt(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  return a < b ? -1 : a > b ? 1 : 0;
}
