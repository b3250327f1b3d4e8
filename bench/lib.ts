import { cpSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { sql } from 'kysely';
import { openDatabase } from '../src/db/connect.js';
import { migrateToLatest } from '../src/db/migrator.js';
import { type SeedMessage, spamAssassin } from '../src/seed/sources.js';
import { upsertMessages } from '../src/sql/seed.js';
import { type CliResult, logRecords, startCli } from '../test/support/cli.js';
import { withAdminClient } from '../test/support/db.js';
import { mulberry32 } from '../test/support/seeded.js';

export type Backend = 'pglite' | 'postgres';

/** A seeded database that scenarios copy, so each starts from the same state. */
export interface Template {
  backend: Backend;
  /** Returns the URL of a fresh copy, and how to drop it. */
  copy(): Promise<{ url: string; drop(): Promise<void> }>;
  drop(): Promise<void>;
}

/** The corpus `times` over, ids 1..6046·times, each copy with distinct ids. */
export function* corpusTimes(times: number): Generator<SeedMessage> {
  for (let k = 0; k < times; k++) {
    for (const m of spamAssassin()) yield { ...m, id: String(Number(m.id) + k * 6046) };
  }
}

/**
 * `count` chat-like messages of 40–400 characters, the same every run: what
 * a chat table holds, where pgembed itself, not the provider, is the
 * bottleneck (a self-hosted model answers in milliseconds).
 */
export function* shortMessages(count: number): Generator<SeedMessage> {
  const random = mulberry32(20_000);
  const words = (
    'ok thanks see you tomorrow can we move the meeting to three I sent the ' +
    'file last night did it arrive sure no problem let me check with the team ' +
    'sounds good what about the invoice from march the build is green again'
  ).split(' ');
  for (let id = 1; id <= count; id++) {
    const length = 40 + Math.floor(random() * 361);
    let text = '';
    while (text.length < length) text += `${words[Math.floor(random() * words.length)]} `;
    yield { id: String(id), content: `${text.slice(0, length - 1).trim()}.` };
  }
}

export async function seedTemplate(
  backend: Backend,
  serverUrl: string,
  times: number,
  messages: Iterable<SeedMessage> = corpusTimes(times),
  name = `corpus_${times}`,
): Promise<Template> {
  const label = `pgembed_bench_tpl_${name}_${process.pid}`;
  let url: string;
  if (backend === 'pglite') {
    const dir = mkdtempSync(join(tmpdir(), 'pgembed-bench-'));
    url = `pglite:${dir}`;
  } else {
    await admin(serverUrl, `create database ${label}`);
    url = withDatabase(serverUrl, label);
  }
  const database = await openDatabase(url);
  try {
    await migrateToLatest(database, { warn: () => {} });
    let chunk: SeedMessage[] = [];
    for (const message of messages) {
      chunk.push(message);
      if (chunk.length === 200) {
        await upsertMessages(database.db, chunk);
        chunk = [];
      }
    }
    await upsertMessages(database.db, chunk);
  } finally {
    await database.close();
  }
  let copies = 0;
  return {
    backend,
    async copy() {
      copies++;
      if (backend === 'pglite') {
        const dir = mkdtempSync(join(tmpdir(), 'pgembed-bench-copy-'));
        cpSync(url.slice('pglite:'.length), dir, { recursive: true });
        return {
          url: `pglite:${dir}`,
          drop: async () => rmSync(dir, { recursive: true, force: true }),
        };
      }
      const name = `${label}_c${copies}`;
      await admin(serverUrl, `create database ${name} template ${label}`);
      return {
        url: withDatabase(serverUrl, name),
        drop: () => admin(serverUrl, `drop database if exists ${name} with (force)`),
      };
    },
    async drop() {
      if (backend === 'pglite')
        rmSync(url.slice('pglite:'.length), { recursive: true, force: true });
      else await admin(serverUrl, `drop database if exists ${label} with (force)`);
    },
  };
}

function withDatabase(serverUrl: string, name: string): string {
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

async function admin(serverUrl: string, statement: string): Promise<void> {
  await withAdminClient(serverUrl, (client) => client.query(statement));
}

export interface WorkerResult {
  result: CliResult;
  /** The worker's own 'run finished' log record. */
  finished: Record<string, unknown>;
  embedded: number;
  skipped: number;
  elapsedMs: number;
  messagesPerSecond: number;
  peakRssMiB: number;
  /** The worker process's CPU time (all its threads), ms per message handled. */
  cpuMsPerMessage: number;
}

/** Runs `npm run embed` as a real child process and reads its own figures. */
export async function runWorker(
  url: string,
  baseUrl: string,
  args: string[],
  options: { stopAfterMs?: number; nodeFlags?: string[] } = {},
): Promise<WorkerResult> {
  const running = startCli(
    'embed',
    ['--allow-partial', ...args],
    {
      DATABASE_URL: url,
      OPENAI_BASE_URL: baseUrl,
      LOG_LEVEL: 'info',
    },
    { timeoutMs: 30 * 60_000, nodeFlags: options.nodeFlags ?? [] },
  );
  if (options.stopAfterMs) {
    await running.waitForStdoutLine((line) => line.includes('"run started"'), 120_000);
    setTimeout(() => running.child.kill('SIGTERM'), options.stopAfterMs).unref();
  }
  const result = await running.result;
  const finished = logRecords(result.stdout, 'run finished')[0];
  if (!finished) throw new Error(`worker did not finish: ${result.stderr.slice(-500)}`);
  const embedded = Number(finished.embedded);
  const skipped = Number(finished.skipped);
  const elapsedMs = Number(finished.elapsed_ms);
  return {
    result,
    finished,
    embedded,
    skipped,
    elapsedMs,
    messagesPerSecond: (embedded + skipped) / (elapsedMs / 1000),
    peakRssMiB: Number(finished.peak_rss_mib),
    cpuMsPerMessage: Number(finished.cpu_ms) / Math.max(embedded + skipped, 1),
  };
}

export interface CommitTimeline {
  /** From the run's start (its first scan included) to its first batch's commit. */
  firstCommitMs: number;
  /** Messages committed after the first batch, a second, until the last commit. */
  steadyMessagesPerSecond: number;
  /** The provider's answer time the worker saw, averaged over batches. */
  requestMsAvg: number;
}

/**
 * Where a finished run's time went, read from its batch rows: the start
 * (the first scan of a new model, the first claims and request) and the
 * steady pace between the first and the last commit.
 */
export async function commitTimeline(url: string): Promise<CommitTimeline> {
  const database = await openDatabase(url);
  try {
    const { rows } = await sql<{
      first_ms: number;
      span_ms: number;
      after_first: number;
      request_ms: number;
    }>`
      with b as (
        select b.size, b.latency_ms, b.committed_at, r.started_at,
               row_number() over (order by b.committed_at, b.batch_no) as n
        from embedding_batches b join embedding_runs r on r.id = b.run_id)
      select extract(epoch from min(committed_at) - min(started_at)) * 1000 as first_ms,
             extract(epoch from max(committed_at) - min(committed_at)) * 1000 as span_ms,
             sum(size) filter (where n > 1)::int as after_first,
             avg(latency_ms)::float8 as request_ms
      from b`.execute(database.db);
    const row = rows[0];
    if (!row) throw new Error('no batches committed');
    return {
      firstCommitMs: Number(row.first_ms),
      steadyMessagesPerSecond: row.after_first / (Number(row.span_ms) / 1000),
      requestMsAvg: row.request_ms,
    };
  } finally {
    await database.close();
  }
}

/** How busy the provider's slots were over a run (`slotProfile`). */
export interface SlotProfile {
  /** From the first request until `concurrency` × 0.9 of them were waiting at once; null: never. */
  rampMs: number | null;
  /** Mean share of the slots busy from then until they fell below 0.9 for good (the tail). */
  steadyShare: number | null;
  /** Mean share busy from the first request to the last answer. */
  overallShare: number;
}

/**
 * Follows the test server's requests in their latency wait (`stats.delayed`)
 * through a run, at every change (no sampling), and says where the run lost
 * its share of ideal: the start, the middle or the end. In a 6 s run at 16
 * in flight, a start of ~1 s until the slots fill costs ~8% of ideal while
 * the middle keeps 98% of them busy (BENCHMARKS.md, "eighth pass").
 */
export function slotProfile(
  fake: { until(check: (stats: { delayed: number }) => boolean): Promise<void> },
  concurrency: number,
): { stop(): SlotProfile } {
  const changes: Array<[number, number]> = [];
  let stopped = false;
  let last = -1;
  fake
    .until((stats) => {
      if (stopped) return true;
      if (stats.delayed !== last) {
        last = stats.delayed;
        changes.push([performance.now(), last]);
      }
      return false;
    })
    .catch(() => {});
  return {
    stop() {
      stopped = true;
      const first = changes.findIndex(([, n]) => n > 0);
      const end = changes.findLastIndex(([, n]) => n > 0) + 1;
      const full = Math.ceil(0.9 * concurrency);
      const filled = changes.findIndex(([, n]) => n >= full);
      const tail = changes.findLastIndex(([, n]) => n >= full) + 1;
      // The time-weighted mean of the slots busy over changes [from, to).
      const mean = (from: number, to: number) => {
        let area = 0;
        for (let i = from; i < to; i++) {
          const [t, n] = changes[i] as [number, number];
          area += n * ((changes[i + 1]?.[0] ?? t) - t);
        }
        const span = (changes[to]?.[0] ?? 0) - (changes[from]?.[0] ?? 0);
        return span > 0 ? area / span / concurrency : 0;
      };
      if (first < 0) {
        return { rampMs: null, steadyShare: null, overallShare: 0 };
      }
      const start = (changes[first] as [number, number])[0];
      return {
        rampMs: filled < 0 ? null : (changes[filled] as [number, number])[0] - start,
        steadyShare: filled < 0 || tail <= filled ? null : mean(filled, tail),
        overallShare: mean(first, end),
      };
    },
  };
}
