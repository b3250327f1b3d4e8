import { sql } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { parseVector } from '../../src/db/vector.js';
import { runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';
import { type FakeOpenAI, fakeEmbedding, startFakeOpenAI } from '../support/fake-openai.js';

// The refusals read the catalog with the same SQL on both backends (PGlite
// is Postgres 18), and a view's repeated id is found by the same SQL too:
// they run on one, the Postgres server where there is one, which spawns a
// CLI in about a third of PGlite's time (25 s of PGlite for the view's two).
const refusalBackend = backends().at(-1);

describe.each(backends())("the application's own table on %s", (backend) => {
  const refusals = backend === refusalBackend ? it : it.skip;
  let fake: FakeOpenAI;
  let database: TestDatabase | undefined;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
  });
  afterEach(async () => {
    await database?.drop();
    database = undefined;
  });

  async function freshDatabase(setup: string[]): Promise<string> {
    database = await createTestDatabase(backend);
    const db = await openDatabase(database.url);
    try {
      for (const statement of setup) await sql.raw(statement).execute(db.db);
    } finally {
      await db.close();
    }
    return database.url;
  }
  async function query<T>(url: string, text: string): Promise<T[]> {
    const db = await openDatabase(url);
    try {
      return (await sql.raw<T>(text).execute(db.db)).rows;
    } finally {
      await db.close();
    }
  }
  const embed = (url: string, args: string[]) =>
    runCli('embed', ['--batch-size', '4', ...args], {
      DATABASE_URL: url,
      OPENAI_BASE_URL: fake.url,
    });

  it('embeds a schema-qualified table with bigint ids and other column names, and creates no messages table', async () => {
    const url = await freshDatabase([
      'create schema app',
      'create table app.chat_turns (turn_id bigint primary key, body text not null, author text)',
      "insert into app.chat_turns select g, 'turn ' || g || ' of the chat', 'bot' from generate_series(1, 10) g",
      "insert into app.chat_turns values (11, '   ', 'bot')",
    ]);
    const args = ['--source', 'app.chat_turns', '--id-column', 'turn_id', '--text-column', 'body'];
    const result = await embed(url, args);
    expect(result.code, result.stderr).toBe(0);
    const rows = await query<{ id: string; embedding: string; type: string }>(
      url,
      `select message_id::text as id, embedding::text as embedding,
              pg_typeof(message_id)::text as type
       from message_embeddings order by message_id`,
    );
    expect(rows.map((r) => r.id)).toEqual(['1', '2', '3', '4', '5', '6', '7', '8', '9', '10']);
    expect(rows[0]?.type).toBe('bigint');
    expect(parseVector(rows[2]?.embedding as string).map(Math.fround)).toEqual(
      Array.from(fakeEmbedding('turn 3 of the chat', 1536)),
    );
    const tables = await query<{ exists: boolean }>(
      url,
      "select to_regclass('public.messages') is not null as exists",
    );
    expect(tables[0]?.exists).toBe(false);
    const status = await runCli('status', [...args, '--json'], { DATABASE_URL: url });
    expect(JSON.parse(status.stdout).coverage[0]).toMatchObject({ eligible: 10, upToDate: 10 });
  }, 60_000);

  it('keys embeddings by uuid for a uuid source: reruns, edits, status and search all follow it', async () => {
    const url = await freshDatabase([
      'create table notes (note_id uuid primary key, txt varchar(200) not null)',
      `insert into notes select ('00000000-0000-4000-8000-' || lpad(to_hex(g), 12, '0'))::uuid,
         'note number ' || g from generate_series(1, 9) g`,
    ]);
    const args = ['--source', 'notes', '--id-column', 'note_id', '--text-column', 'txt'];
    const first = await embed(url, [...args, '--batch-size', '4', '--concurrency', '2']);
    expect(first.code, first.stderr).toBe(0);
    const types = await query<{ table: string; type: string }>(
      url,
      `select attrelid::regclass::text as table, format_type(atttypid, atttypmod) as type
       from pg_attribute
       where attname = 'message_id' and attrelid in
         ('message_embeddings'::regclass, 'embedding_skips'::regclass, 'embedding_queue'::regclass)
       order by 1`,
    );
    // message_embeddings', embedding_skips' and embedding_queue's message_id.
    expect(types.map((t) => t.type)).toEqual(['uuid', 'uuid', 'uuid']);
    const count = await query<{ n: number }>(
      url,
      'select count(*)::int as n from message_embeddings',
    );
    expect(count[0]?.n).toBe(9);

    fake.reset();
    expect((await embed(url, args)).code).toBe(0);
    expect(fake.stats.requests).toBe(0);
    await query(
      url,
      "update notes set txt = 'an edited note' where note_id = '00000000-0000-4000-8000-000000000005'",
    );
    expect((await embed(url, args)).code).toBe(0);
    expect([...fake.stats.seen.keys()]).toEqual(['an edited note']);

    const found = await runCli('search', ['note number 7', ...args, '--json', '-k', '1'], {
      DATABASE_URL: url,
      OPENAI_BASE_URL: fake.url,
    });
    expect(found.code, found.stderr).toBe(0);
    expect(JSON.parse(found.stdout).hits[0]).toMatchObject({
      messageId: '00000000-0000-4000-8000-000000000007',
    });
  }, 90_000);

  // A duplicate id fails the upsert of the batch holding both copies, or is
  // stepped over by the keyset; a NULL id can be neither paged nor keyed.
  refusals.for([
    [
      'a table with duplicate ids and no unique index',
      [
        'create table turns (turn_id bigint not null, body text not null)',
        "insert into turns values (1, 'turn 1'), (2, 'turn 2'), (2, 'turn 2 again')",
      ],
      /^pgembed: --id-column turn_id of turns is not declared unique: give it a primary key, or a unique constraint/,
    ],
    [
      'a table whose unique id allows NULL',
      [
        'create table turns (turn_id bigint unique, body text not null)',
        "insert into turns values (1, 'turn 1'), (2, 'turn 2'), (null, 'no id')",
      ],
      /^pgembed: --id-column turn_id of turns allows NULL: declare it NOT NULL \(a primary key is\)/,
    ],
    [
      'a table whose id is unique only through a partial index',
      [
        'create table turns (turn_id bigint not null, body text not null)',
        'create unique index on turns (turn_id) where turn_id > 1',
        "insert into turns values (1, 'turn 1'), (1, 'turn 1 again'), (2, 'turn 2')",
      ],
      /^pgembed: --id-column turn_id of turns is not declared unique/,
    ],
  ] as const)(
    'refuses %s before any work, with one line, and migrates nothing',
    async ([, setup, pattern]) => {
      const url = await freshDatabase([...setup]);
      fake.reset();
      const result = await embed(url, [
        '--source',
        'turns',
        '--id-column',
        'turn_id',
        '--text-column',
        'body',
      ]);
      expect(result.code, result.stderr).toBe(1);
      expect(stderrLines(result), result.stderr).toHaveLength(1);
      expect(stderrLines(result)[0]).toMatch(pattern);
      expect(fake.stats.requests).toBe(0);
      const tables = await query<{ exists: boolean }>(
        url,
        "select to_regclass('message_embeddings') is not null as exists",
      );
      expect(tables[0]?.exists).toBe(false);
    },
  );

  it('refuses a second source in one schema, naming the first, before any work', async () => {
    const url = await freshDatabase([
      'create table good (turn_id bigint primary key, body text not null)',
      "insert into good values (1, 'the good one')",
      'create table other (turn_id bigint primary key, body text not null)',
      "insert into other values (1, 'a different first message')",
    ]);
    const columns = ['--id-column', 'turn_id', '--text-column', 'body'];
    const first = await embed(url, ['--source', 'good', ...columns]);
    expect(first.code, first.stderr).toBe(0);
    fake.reset();
    // Its id 1 would overwrite the embedding of good's id 1.
    const result = await embed(url, ['--source', 'other', ...columns]);
    expect(result.code, result.stderr).toBe(1);
    expect(stderrLines(result), result.stderr).toHaveLength(1);
    expect(stderrLines(result)[0]).toMatch(
      /^pgembed: this schema's embeddings belong to --source good \(--id-column turn_id, --text-column body\); one schema holds one source/,
    );
    expect(fake.stats.requests).toBe(0);
    const runs = await query<{ n: number }>(url, 'select count(*)::int as n from embedding_runs');
    expect(runs[0]?.n).toBe(1);
  }, 60_000);

  // A view has no constraints to inspect: a page whose span holds an id twice
  // (counting every row, eligible or not) stops the run, naming the id, before
  // its batch is sent. The second copy of 4 sits at the first page's edge
  // (--batch-size 4), where the keyset alone would step over it. The same SQL
  // finds it on both backends: on one, like the refusals.
  refusals.for([
    ['inside the first page', "(2, 'turn 2 again')"],
    ["at the first page's edge", "(4, 'turn 4 again')"],
  ] as const)(
    'stops a run over a view whose id repeats %s, naming the id, with nothing embedded',
    async ([, copy]) => {
      const url = await freshDatabase([
        'create table turns (turn_id bigint, body text not null)',
        "insert into turns select g, 'turn ' || g from generate_series(1, 10) g",
        `insert into turns values ${copy}`,
        'create view turns_view as select turn_id, body from turns',
      ]);
      fake.reset();
      const args = ['--source', 'turns_view', '--id-column', 'turn_id', '--text-column', 'body'];
      const id = copy.slice(1, 2);
      const line = `pgembed: --source turns_view has 2 rows with turn_id ${id}: ids must be unique (they key the embeddings); make it return each id once`;
      // The dry run, which writes nothing, finds it first, in one line.
      const dry = await embed(url, [...args, '--dry-run']);
      expect(dry.code, dry.stderr).toBe(1);
      expect(stderrLines(dry)).toEqual([line]);
      const result = await embed(url, args);
      expect(result.code, result.stderr).toBe(1);
      // The run has begun: its summary, then the line.
      expect(stderrLines(result).at(-1)).toBe(line);
      expect(result.stderr).not.toMatch(/^\s+at /m);
      expect(result.stderr).not.toMatch(/cannot affect row a second time/);
      expect(fake.stats.requests).toBe(0);
      const runs = await query<{ status: string; error: string }>(
        url,
        'select status, error from embedding_runs',
      );
      expect(runs).toEqual([
        {
          status: 'failed',
          error: expect.stringContaining(`has 2 rows with turn_id ${id}`),
        },
      ]);
      const count = await query<{ n: number }>(
        url,
        'select count(*)::int as n from message_embeddings',
      );
      expect(count[0]?.n).toBe(0);
    },
  );

  it("leaves out a view's rows whose id is NULL, in the run and in status", async () => {
    const url = await freshDatabase([
      'create table turns (turn_id bigint, body text not null)',
      "insert into turns values (null, 'no id at all')",
      "insert into turns select g, 'turn ' || g from generate_series(1, 6) g",
      "insert into turns values (null, 'no id either')",
      'create view turns_view as select turn_id, body from turns',
    ]);
    const args = ['--source', 'turns_view', '--id-column', 'turn_id', '--text-column', 'body'];
    fake.reset();
    const result = await embed(url, args);
    expect(result.code, result.stderr).toBe(0);
    expect(result.stderr).toMatch(/^pgembed run \d+ succeeded:/m);
    expect([...fake.stats.seen.keys()].sort()).toEqual(
      ['turn 1', 'turn 2', 'turn 3', 'turn 4', 'turn 5', 'turn 6'].sort(),
    );
    const rows = await query<{ id: string }>(
      url,
      'select message_id::text as id from message_embeddings order by message_id',
    );
    expect(rows.map((r) => r.id)).toEqual(['1', '2', '3', '4', '5', '6']);
    const status = await runCli('status', [...args, '--json'], { DATABASE_URL: url });
    expect(JSON.parse(status.stdout).coverage[0]).toMatchObject({ eligible: 6, upToDate: 6 });
  }, 60_000);

  refusals.for([
    [['--source', 'no_such_table'], /^pgembed: --source no_such_table: no such table or view/],
    [
      ['--source', 'notes', '--text-column', 'body'],
      /^pgembed: --source notes has no column 'body' \(--text-column\)/,
    ],
    [
      ['--source', 'notes', '--id-column', 'slug', '--text-column', 'txt'],
      /^pgembed: --id-column slug is text; ids must be an integer type or uuid/,
    ],
    [['--source', 'notes; drop table notes'], /^pgembed: --source must be a table or view name/],
  ] as const)(
    'refuses %j before any work, with one line naming the problem',
    async ([args, pattern]) => {
      const url = await freshDatabase([
        'create table notes (id bigint primary key, slug text, txt text not null)',
        "insert into notes values (1, 'a', 'one note')",
      ]);
      fake.reset();
      const result = await embed(url, [...args]);
      expect(result.code).toBe(1);
      expect(stderrLines(result)).toHaveLength(1);
      expect(stderrLines(result)[0]).toMatch(pattern);
      expect(fake.stats.requests).toBe(0);
      const tables = await query<{ exists: boolean }>(
        url,
        "select to_regclass('message_embeddings') is not null as exists",
      );
      expect(tables[0]?.exists).toBe(false);
    },
  );
});

// Ids key the embeddings, so two sources whose ids overlap live in two
// schemas: each schema has its own embeddings, queue and triggers.
describe.runIf(backends().includes('postgres'))('two sources with the same ids', () => {
  let fake: FakeOpenAI;
  let database: TestDatabase;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
    database = await createTestDatabase('postgres');
    const db = await openDatabase(database.url);
    try {
      for (const schema of ['sales', 'support']) {
        await sql.raw(`create schema ${schema}`).execute(db.db);
        await sql
          .raw(`create table ${schema}.notes (id bigint primary key, body text not null)`)
          .execute(db.db);
        await sql
          .raw(
            `insert into ${schema}.notes select g, '${schema} note ' || g from generate_series(1, 3) g`,
          )
          .execute(db.db);
      }
    } finally {
      await db.close();
    }
  });
  afterAll(async () => {
    await fake?.close();
    await database?.drop();
  });

  const inSchema = (schema: string) => {
    const url = new URL(database.url);
    url.searchParams.set('options', `-csearch_path=${schema}`);
    return url.toString();
  };

  it('embeds each in a schema of its own, neither overwriting the other, and an edit in one re-embeds only it', async () => {
    const args = ['--source', 'notes', '--text-column', 'body'];
    for (const schema of ['sales', 'support']) {
      const result = await runCli('embed', args, {
        DATABASE_URL: inSchema(schema),
        OPENAI_BASE_URL: fake.url,
      });
      expect(result.code, result.stderr).toBe(0);
    }
    const db = await openDatabase(database.url);
    try {
      for (const schema of ['sales', 'support']) {
        const { rows } = await sql<{ id: string; embedding: string; body: string }>`
          select e.message_id::text as id, e.embedding::text as embedding, n.body
          from ${sql.id(schema, 'message_embeddings')} e
          join ${sql.id(schema, 'notes')} n on n.id = e.message_id order by e.message_id`.execute(
          db.db,
        );
        expect(rows.map((r) => r.id)).toEqual(['1', '2', '3']);
        for (const row of rows) {
          expect(row.body).toBe(`${schema} note ${row.id}`);
          expect(parseVector(row.embedding).map(Math.fround)).toEqual(
            Array.from(fakeEmbedding(row.body, 1536)),
          );
        }
      }
      fake.reset();
      await sql`update support.notes set body = 'support note 2, edited' where id = 2`.execute(
        db.db,
      );
      for (const schema of ['sales', 'support']) {
        const result = await runCli('embed', args, {
          DATABASE_URL: inSchema(schema),
          OPENAI_BASE_URL: fake.url,
        });
        expect(result.code, result.stderr).toBe(0);
      }
      expect([...fake.stats.seen.keys()]).toEqual(['support note 2, edited']);
    } finally {
      await db.close();
    }
  }, 60_000);
});
