// The provider path alone: the texts in PGEMBED_TEXTS_FILE (a JSON array)
// sent to PGEMBED_BASE_URL through pgembed's own client (the real SDK, base64
// decoded into Float32Array), in batches of PGEMBED_BATCH, PGEMBED_CONCURRENCY
// at a time, with no database at all. What an end-to-end run could reach if
// writing cost nothing. Prints one JSON line: messages a second and CPU.
//
// With PGEMBED_DATABASE_URL, the texts are instead read from that database's
// `messages` by keyset, 2,000 at a time, and each answer's vectors written back
// by the backend's write path (as the write path alone writes them), in a
// provider of their own, PGEMBED_WRITE_ROWS or more a transaction, one
// transaction at a time: reading, sending and writing on the same cores, with
// none of a run's claims, scan, fence or records. On PGlite, whose one
// session takes every read and write in turn, a run does all of this and
// its coordination besides. On a server a run's commits go on several
// connections at once, so a run can pass it there.
import { readFileSync } from 'node:fs';
import { sql } from 'kysely';
import { openDatabase } from '../dist/src/db/connect.js';
import { readEmbeddingColumnType } from '../dist/src/db/embedding-column.js';
import { createOpenAIProvider } from '../dist/src/provider/client.js';

const batchSize = Number(process.env.PGEMBED_BATCH);
const concurrency = Number(process.env.PGEMBED_CONCURRENCY);
const provider = createOpenAIProvider({
  apiKey: undefined,
  baseURL: process.env.PGEMBED_BASE_URL,
  model: 'text-embedding-3-small',
  dimensions: undefined,
  defaultDimensions: 1536,
  timeoutMs: 60_000,
});

const databaseUrl = process.env.PGEMBED_DATABASE_URL;
const database = databaseUrl ? await openDatabase(databaseUrl) : undefined;
const writer = database?.embeddingWriter(await readEmbeddingColumnType(database.db), 'bigint');
const target = { provider: 'bench-together', model: 'm', runId: '0' };
const zeroHash = '00'.repeat(32);
const writeRows = Number(process.env.PGEMBED_WRITE_ROWS ?? 500);
let unwritten = [];
let draining;
// One transaction at a time, of what was answered while the last one ran.
async function drain(all) {
  while (unwritten.length >= (all ? 1 : writeRows)) {
    const rows = unwritten;
    unwritten = [];
    await database.db.transaction().execute((trx) => writer.upsert(trx, target, rows));
  }
}
function write(all) {
  draining ??= drain(all).finally(() => {
    draining = undefined;
  });
  return draining;
}

// The texts: from the file, or read from the database as a run reads them.
const fromFile = database
  ? undefined
  : JSON.parse(readFileSync(process.env.PGEMBED_TEXTS_FILE, 'utf8')).map((content, i) => ({
      id: String(i + 1),
      content,
    }));
let unread = fromFile ?? [];
let after = '0';
let exhausted = database === undefined;
let reading;
async function readPage() {
  const { rows } = await sql`select id::text as id, content from messages
    where id > ${after}::bigint order by id limit 2000`.execute(database.db);
  if (rows.length === 0) exhausted = true;
  else {
    after = rows.at(-1).id;
    unread = unread.concat(rows);
  }
}
function readAhead() {
  reading ??= readPage().finally(() => {
    reading = undefined;
  });
  return reading;
}
// A page is read ahead while fewer than a page's worth are left, so a lane
// seldom waits for a read: on PGlite's one session a read waits for the
// write transaction before it.
async function take(count) {
  if (unread.length < 2000 && !exhausted) readAhead();
  while (unread.length < count && !exhausted) await readAhead();
  return unread.splice(0, count);
}

const cpuBefore = process.cpuUsage();
const startedAt = performance.now();
let vectors = 0;
async function lane() {
  for (let batch = await take(batchSize); batch.length > 0; batch = await take(batchSize)) {
    const { vectors: answer } = await provider.embed(batch.map((m) => m.content));
    if (database) {
      for (const [k, vector] of answer.entries()) {
        unwritten.push({
          messageId: batch[k].id,
          vector,
          sha256Hex: zeroHash,
          inputTokens: 1,
          truncated: false,
        });
      }
      write(false);
    }
    vectors += answer.length;
  }
}
await Promise.all(Array.from({ length: concurrency }, lane));
while (database && (draining || unwritten.length > 0)) await write(true);
const elapsedMs = performance.now() - startedAt;
const cpu = process.cpuUsage(cpuBefore);
await database?.close();
process.stdout.write(
  `${JSON.stringify({
    messages: vectors,
    elapsed_ms: elapsedMs,
    messages_per_s: vectors / (elapsedMs / 1000),
    cpu_ms: (cpu.user + cpu.system) / 1000,
  })}\n`,
);
