import { spawn } from 'node:child_process';
import { sql } from 'kysely';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { isLog, type RunningCli, startCli } from '../support/cli.js';
import { workerHealthcheckScript } from '../support/compose-healthcheck.js';
import { backends, createTestDatabase, openMigrated, type TestDatabase } from '../support/db.js';
import { sampleTexts, seedMessages } from '../support/embed-run.js';
import { type FakeOpenAI, startFakeOpenAI } from '../support/fake-openai.js';

// One backend: the Postgres server where there is one. The metrics read the
// same run rows on both; what differs by backend is tested elsewhere.
const backend = backends().at(-1) ?? 'pglite';
const MODEL = { provider: 'openai', model: 'text-embedding-3-small' };
// ~9,000 cl100k tokens: over the 8,192 limit, so skipped with --allow-partial.
const TOO_LONG = 'lorem ipsum dolor sit amet '.repeat(1800);
const API_KEY = 'sk-metrics-test-secret-0123456789';

type Samples = Map<string, number>;

/** Prometheus text format → `name{k="v",…}` (labels sorted) → value. */
function parseMetrics(text: string): Samples {
  const samples: Samples = new Map();
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const match = /^([a-z_]+)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!match) throw new Error(`not a sample line: ${line}`);
    const labels = [...(match[2] ?? '').matchAll(/([a-z_]+)="([^"]*)"/g)]
      .map(([, k, v]) => `${k}="${v}"`)
      .sort();
    samples.set(`${match[1]}{${labels.join(',')}}`, Number(match[3]));
  }
  return samples;
}

function key(name: string, labels: Record<string, string> = {}): string {
  const all = { ...MODEL, ...labels };
  const parts = Object.entries(all)
    .map(([k, v]) => `${k}="${v}"`)
    .sort();
  return `${name}{${parts.join(',')}}`;
}

async function get(url: string): Promise<{ status: number; text: string }> {
  const res = await fetch(url);
  return { status: res.status, text: await res.text() };
}

/** Scrapes until `done` holds: a counted condition on the worker's own figures. */
async function scrapeUntil(url: string, done: (s: Samples) => boolean): Promise<Samples> {
  for (;;) {
    const samples = parseMetrics((await get(`${url}/metrics`)).text);
    if (done(samples)) return samples;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

function watcher(target: TestDatabase, fake: FakeOpenAI, args: string[]): RunningCli {
  const w = startCli(
    'embed',
    ['--watch', '--allow-partial', '--batch-size', '8', '--metrics-port', '0', ...args],
    {
      DATABASE_URL: target.url,
      OPENAI_BASE_URL: fake.url,
      OPENAI_API_KEY: API_KEY,
      LOG_LEVEL: 'info',
    },
    { timeoutMs: 120_000 },
  );
  void w.result.catch(() => {});
  return w;
}

/** Exit code of docker-compose.yml's worker healthcheck, pointed at `url`. */
function composeHealthcheck(url: string): Promise<number | null> {
  const script = workerHealthcheckScript();
  expect(script).toContain('http://127.0.0.1:9464');
  const child = spawn(process.execPath, ['-e', script.replace('http://127.0.0.1:9464', url)], {
    stdio: 'ignore',
  });
  return new Promise((resolve) => child.once('exit', (code) => resolve(code)));
}

async function serving(w: RunningCli): Promise<string> {
  const line = await w.waitForStdoutLine((l) => isLog(l, 'serving /metrics, /healthz and /readyz'));
  const { url } = JSON.parse(line) as { url: string };
  expect(url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
  return url;
}

describe(`the worker's metrics and health endpoints (${backend})`, () => {
  let fake: FakeOpenAI;
  beforeAll(async () => {
    fake = await startFakeOpenAI();
  });
  afterAll(async () => {
    await fake?.close();
  });

  it('counts what the run row counts, and answers health and readiness', async () => {
    const target = await createTestDatabase(backend);
    const texts = sampleTexts(40);
    try {
      const w = watcher(target, fake, []);
      const url = await serving(w);
      // Written while it watches, as an application would.
      const database = await openDatabase(target.url);
      try {
        await w.waitForStdoutLine((l) => isLog(l, 'run started'));
        await seedMessages(database.db, [...texts, TOO_LONG, TOO_LONG.replace('lorem', 'x')]);
      } finally {
        await database.close();
      }
      const samples = await scrapeUntil(
        url,
        (s) =>
          (s.get(key('pgembed_messages_embedded_total')) ?? 0) +
            (s.get(key('pgembed_messages_skipped_total', { reason: 'context_length' })) ?? 0) ===
            42 && s.get(key('pgembed_queue_pending_messages')) === 0,
      );
      // Labels name the target only: no text, id or key reaches a scrape.
      const text = (await get(`${url}/metrics`)).text;
      expect(text).not.toContain(API_KEY);
      expect(text).not.toContain('lorem');
      expect(text).not.toMatch(/message_id|run_id/);
      expect(await get(`${url}/healthz`)).toEqual({ status: 200, text: 'ok\n' });
      expect(await get(`${url}/readyz`)).toEqual({ status: 200, text: 'ready\n' });
      expect(await composeHealthcheck(url)).toBe(0);
      expect((await get(`${url}/other`)).status).toBe(404);

      w.child.kill('SIGTERM');
      expect((await w.result).code).toBe(143);
      // Closed with the worker.
      await expect(fetch(`${url}/healthz`)).rejects.toThrow();
      // Nothing was sent after the last scrape (the queue was empty): the run
      // row, final once the worker has stopped, holds what it showed.
      const db = await openDatabase(target.url);
      try {
        const { rows } = await sql<{
          embedded: number;
          skipped: number;
          truncated: number;
          tokens: number;
          tokens_billed: number;
          requests_billed: number;
          batches: number;
          skip_rows: number;
        }>`
          select embedded, skipped, truncated, tokens::int, tokens_billed::int, requests_billed,
            batches, (select count(*)::int from embedding_skips) as skip_rows
          from embedding_runs`.execute(db.db);
        expect(rows).toHaveLength(1);
        const run = rows[0]!;
        expect(run).toMatchObject({ embedded: 40, skipped: 2, skip_rows: 2 });
        expect(samples.get(key('pgembed_messages_embedded_total'))).toBe(run.embedded);
        expect(
          samples.get(key('pgembed_messages_skipped_total', { reason: 'context_length' })),
        ).toBe(run.skipped);
        expect(samples.get(key('pgembed_messages_truncated_total'))).toBe(run.truncated);
        expect(samples.get(key('pgembed_tokens_kept_total'))).toBe(run.tokens);
        expect(samples.get(key('pgembed_tokens_billed_total'))).toBe(run.tokens_billed);
        // Every request was answered 200, and billed: the over-long ones were
        // counted over the limit before sending and never went out.
        expect(samples.get(key('pgembed_requests_total', { outcome: 'ok' }))).toBe(
          run.requests_billed,
        );
        expect(samples.get(key('pgembed_requests_total', { outcome: '4xx' }))).toBeUndefined();
        expect(samples.get(key('pgembed_request_duration_seconds_count'))).toBe(
          run.requests_billed,
        );
        expect(
          samples.get(key('pgembed_batch_commit_duration_seconds_count')),
        ).toBeGreaterThanOrEqual(run.batches);
        expect(samples.get(key('pgembed_queue_lag_seconds'))).toBe(0);
        expect(samples.get(key('pgembed_concurrency'))).toBe(4);
        expect(samples.get(key('pgembed_retries_total'))).toBe(0);
      } finally {
        await db.close();
      }
    } finally {
      await target.drop();
    }
  }, 120_000);

  it('is not ready while the provider keeps failing, and counts the failures by class', async () => {
    const target = await createTestDatabase(backend);
    const database = await openMigrated(target.url);
    try {
      fake.reset();
      fake.failWhenInputContains('', { kind: 'server-error', status: 503 });
      await seedMessages(database.db, sampleTexts(40));
      // PGlite: the worker opens the directory itself.
      await database.close();
      const w = watcher(target, fake, ['--max-retries', '0']);
      const url = await serving(w);
      // Three batches in a row fail with nothing embedded: the circuit opens.
      for (;;) {
        const ready = await get(`${url}/readyz`);
        if (ready.status === 503) {
          expect(ready.text).toBe(
            'not ready: the provider is failing: batches keep failing with nothing embedded\n',
          );
          break;
        }
        expect(ready).toEqual({ status: 200, text: 'ready\n' });
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      const samples = parseMetrics((await get(`${url}/metrics`)).text);
      const failed = samples.get(key('pgembed_requests_total', { outcome: '5xx' })) ?? 0;
      expect(failed).toBeGreaterThanOrEqual(3);
      expect(
        samples.get(key('pgembed_provider_errors_total', { class: 'provider_transient' })),
      ).toBe(failed);
      expect(samples.get(key('pgembed_messages_embedded_total'))).toBe(0);
      // Alive, not ready: the compose healthcheck fails, the process stays.
      expect((await get(`${url}/healthz`)).status).toBe(200);
      expect(await composeHealthcheck(url)).toBe(1);
      w.child.kill('SIGTERM');
      expect((await w.result).code).toBe(143);
    } finally {
      fake.reset();
      await target.drop();
    }
  }, 120_000);
});
