import { type Kysely, sql } from 'kysely';
import { ConfigError } from '../errors.js';

/**
 * Where the messages are: pgembed's own `messages(id, content)` by default, or
 * a table or view of the application's (--source, --id-column, --text-column).
 */
export interface MessageSource {
  /** `table` or `schema.table`, each part a plain identifier, used as written (quoted). */
  table: string;
  idColumn: string;
  textColumn: string;
}

/** Ids are bigint (any integer column) or uuid; the embeddings tables follow. */
export type IdType = 'bigint' | 'uuid';

export const DEFAULT_SOURCE: MessageSource = {
  table: 'messages',
  idColumn: 'id',
  textColumn: 'content',
};

const IDENTIFIER = /^[A-Za-z_][A-Za-z0-9_]{0,62}$/;

/** Checks the names' syntax: identifiers only, so nothing but a name reaches SQL. */
export function parseSource(settings: {
  source: string;
  idColumn: string;
  textColumn: string;
}): MessageSource {
  const parts = settings.source.split('.');
  if (parts.length > 2 || !parts.every((p) => IDENTIFIER.test(p))) {
    throw new ConfigError(
      `--source must be a table or view name, optionally schema-qualified (letters, digits, _), got '${settings.source}'`,
    );
  }
  for (const [flag, value] of [
    ['--id-column', settings.idColumn],
    ['--text-column', settings.textColumn],
  ] as const) {
    if (!IDENTIFIER.test(value)) {
      throw new ConfigError(`${flag} must be a column name (letters, digits, _), got '${value}'`);
    }
  }
  return { table: settings.source, idColumn: settings.idColumn, textColumn: settings.textColumn };
}

function tableRef(source: MessageSource) {
  return sql.id(...source.table.split('.'));
}

/**
 * The source as `m(id, content)` for every query: a plain subquery, which
 * Postgres inlines, so `m.id > $1 order by m.id` still walks the id index.
 */
export function sourceRelation(source: MessageSource) {
  return sql`(select ${sql.id(source.idColumn)} as id, ${sql.id(source.textColumn)} as content
              from ${tableRef(source)})`;
}

const INTEGER_TYPES = new Set(['bigint', 'integer', 'smallint']);
const TEXT_TYPE = /^(text|character varying|character|varchar|char)\b/;

/**
 * Refuses, before any work, a source that is not an existing table or view
 * with those columns of usable types; returns its id type.
 */
export async function inspectSource<T>(db: Kysely<T>, source: MessageSource): Promise<IdType> {
  const qualified = source.table
    .split('.')
    .map((p) => `"${p}"`)
    .join('.');
  const { rows } = await sql<{
    relkind: string | null;
    column: string | null;
    type: string | null;
  }>`
    select c.relkind::text as relkind, a.attname::text as column,
           format_type(a.atttypid, a.atttypmod) as type
    from pg_class c
    left join pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
    where c.oid = to_regclass(${qualified})`.execute(db);
  const where = `--source ${source.table}`;
  if (rows.length === 0) {
    throw new ConfigError(`${where}: no such table or view (names are case-sensitive as given)`);
  }
  if (!['r', 'v', 'm', 'p', 'f'].includes(rows[0]?.relkind ?? '')) {
    throw new ConfigError(`${where} is not a table or view`);
  }
  const typeOf = (column: string) => rows.find((r) => r.column === column)?.type;
  const idType = typeOf(source.idColumn);
  const textType = typeOf(source.textColumn);
  if (!idType) throw new ConfigError(`${where} has no column '${source.idColumn}' (--id-column)`);
  if (!textType) {
    throw new ConfigError(`${where} has no column '${source.textColumn}' (--text-column)`);
  }
  if (!TEXT_TYPE.test(textType)) {
    throw new ConfigError(
      `--text-column ${source.textColumn} is ${textType}; it must be text or varchar`,
    );
  }
  if (idType === 'uuid') return 'uuid';
  if (INTEGER_TYPES.has(idType)) return 'bigint';
  throw new ConfigError(
    `--id-column ${source.idColumn} is ${idType}; ids must be an integer type or uuid`,
  );
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
