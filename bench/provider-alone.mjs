// The provider path alone: the texts in PGEMBED_TEXTS_FILE (a JSON array)
// sent to PGEMBED_BASE_URL through pgembed's own client (the real SDK, base64
// decoded into Float32Array), in batches of PGEMBED_BATCH, PGEMBED_CONCURRENCY
// at a time, with no database at all. What an end-to-end run could reach if
// writing cost nothing. Prints one JSON line: messages a second and CPU.
//
// With PGEMBED_DATABASE_URL, each answer's vectors are also written there by
// the backend's write path (as the write path alone writes them), in a
// provider of their own, PGEMBED_WRITE_ROWS or more a transaction, one
// transaction at a time: the provider path and the write path together on
// the same cores, with none of a run's claims, scan, fence or records. What
// any design could reach on this machine.
import { readFileSync } from 'node:fs';
import { openDatabase } from '../dist/src/db/connect.js';
import { readEmbeddingColumnType } from '../dist/src/db/embedding-column.js';
import { createOpenAIProvider } from '../dist/src/provider/client.js';

const texts = JSON.parse(readFileSync(process.env.PGEMBED_TEXTS_FILE, 'utf8'));
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

const cpuBefore = process.cpuUsage();
const startedAt = performance.now();
let next = 0;
let vectors = 0;
async function lane() {
  while (next < texts.length) {
    const first = next;
    const batch = texts.slice(first, first + batchSize);
    next += batchSize;
    const { vectors: answer } = await provider.embed(batch);
    if (database) {
      for (const [k, vector] of answer.entries()) {
        unwritten.push({
          messageId: String(first + k + 1),
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
