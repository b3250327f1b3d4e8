// The provider path alone: the texts in PGEMBED_TEXTS_FILE (a JSON array)
// sent to PGEMBED_BASE_URL through pgembed's own client (the real SDK, base64
// decoded into Float32Array), in batches of PGEMBED_BATCH, PGEMBED_CONCURRENCY
// at a time, with no database at all. What an end-to-end run could reach if
// writing cost nothing. Prints one JSON line: messages a second and CPU.
import { readFileSync } from 'node:fs';
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

const cpuBefore = process.cpuUsage();
const startedAt = performance.now();
let next = 0;
let vectors = 0;
async function lane() {
  while (next < texts.length) {
    const batch = texts.slice(next, next + batchSize);
    next += batchSize;
    const { vectors: answer } = await provider.embed(batch);
    vectors += answer.length;
  }
}
await Promise.all(Array.from({ length: concurrency }, lane));
const elapsedMs = performance.now() - startedAt;
const cpu = process.cpuUsage(cpuBefore);
process.stdout.write(
  `${JSON.stringify({
    messages: vectors,
    elapsed_ms: elapsedMs,
    messages_per_s: vectors / (elapsedMs / 1000),
    cpu_ms: (cpu.user + cpu.system) / 1000,
  })}\n`,
);
