import { ConfigError } from '../errors.js';
import { redactUrl } from '../redact.js';

/*
 * What the settings name in the database, checked before anything connects:
 * the URL, the message source's identifiers, the column types. No driver is
 * imported here, so `--help` and a bad flag answer without loading kysely, pg
 * or PGlite (see src/cli/pgembed.ts).
 */

export const DEFAULT_PGLITE_DIR = './.data/pglite';

export type DatabaseTarget =
  | { kind: 'pglite'; dataDir: string | undefined /* undefined: in memory */ }
  | { kind: 'postgres'; connectionString: string };

/** `DATABASE_URL` → backend. Unset means the embedded default, so a newcomer needs no server. */
export function parseDatabaseUrl(url: string | undefined): DatabaseTarget {
  const value = url?.trim();
  if (!value) return { kind: 'pglite', dataDir: DEFAULT_PGLITE_DIR };
  if (value.startsWith('postgres://') || value.startsWith('postgresql://')) {
    try {
      new URL(value);
    } catch {
      throw new ConfigError(`DATABASE_URL is not a valid URL: ${redactUrl(value)}`);
    }
    return { kind: 'postgres', connectionString: value };
  }
  if (value.startsWith('pglite:')) {
    const rest = value.slice('pglite:'.length).replace(/^\/\//, '');
    if (rest === 'memory') return { kind: 'pglite', dataDir: undefined };
    return { kind: 'pglite', dataDir: rest || DEFAULT_PGLITE_DIR };
  }
  const scheme = /^([a-z][a-z0-9+.-]*):/i.exec(value)?.[1];
  throw new ConfigError(
    `DATABASE_URL has unsupported scheme '${scheme ?? value}': use postgres://user:pass@host:5432/db, pglite:<dir>, or pglite:memory`,
  );
}

export const EMBEDDING_COLUMN_TYPES = ['vector', 'halfvec', 'real[]'] as const;
export type EmbeddingColumnType = (typeof EMBEDDING_COLUMN_TYPES)[number];

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
