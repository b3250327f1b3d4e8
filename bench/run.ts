/**
 * npm run bench [-- --only startup,overhead,short,latency,rate,fleet,memory,peer] [--backends pglite,postgres]
 * npm run bench -- --only latency [--latency-concurrency 1,4,16,64]
 * npm run bench -- --only sync [--sync-parts size,latency,triggers,rerun]  (see bench/sync.ts)
 * npm run bench -- --only short,latency --profile-dir DIR  (their workers under node --cpu-prof)
 *
 * Measures pgembed against the local OpenAI-compatible test server on the
 * SpamAssassin corpus, prints a table and writes bench/results/<time>.json.
 * Postgres: BENCH_DATABASE_URL, else TEST_DATABASE_URL, else the local server.
 * Figures, not assertions: nothing here passes or fails.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { parseArgs, promisify } from 'node:util';
import { openDatabase } from '../src/db/connect.js';
import { readEmbeddingColumnType } from '../src/db/embedding-column.js';
import { type SeedMessage, spamAssassin } from '../src/seed/sources.js';
import { fakeEmbedding, startFakeOpenAI } from '../test/support/fake-openai.js';
import {
  type Backend,
  commitTimeline,
  runWorker,
  seedTemplate,
  shortMessages,
  slotProfile,
  type Template,
} from './lib.js';
import { runPeer } from './peer.js';
import { startupBench } from './startup.js';
import { syncBench } from './sync.js';

const { values } = parseArgs({
  options: {
    only: { type: 'string', default: 'startup,overhead,short,latency,rate,fleet,memory,peer' },
    backends: { type: 'string', default: 'pglite,postgres' },
    'rate-seconds': { type: 'string', default: '120' },
    'rate-tpm': { type: 'string', default: '1000000' },
    // --only latency: which --concurrency values to run.
    'latency-concurrency': { type: 'string', default: '1,4,16,64' },
    // --only sync: not in the default list (it bulk-loads 1 M rows).
    'sync-parts': { type: 'string', default: 'size,latency,triggers,rerun' },
    'sync-seconds': { type: 'string', default: '20' },
    'sync-rates': { type: 'string', default: '200,1000' },
    'sync-messages': { type: 'string', default: '1000000' },
    'sync-stale-reconcile': { type: 'string', default: 'true' },
    // --only short, latency: profile each run's worker (every thread) into DIR/<scenario>.
    'profile-dir': { type: 'string' },
  },
});
const only = new Set(values.only.split(','));
const backendList = values.backends.split(',') as Backend[];
const serverUrl =
  process.env.BENCH_DATABASE_URL ??
  process.env.TEST_DATABASE_URL ??
  'postgres://postgres@127.0.0.1:5432/postgres';

const results: Record<string, unknown> = {
  date: new Date().toISOString(),
  machine: {
    cpus: cpus().length,
    cpu: cpus()[0]?.model,
    memory_gib: Math.round(totalmem() / 2 ** 30),
    node: process.version,
  },
  postgres: backendList.includes('postgres') ? serverUrl.replace(/:[^:@/]*@/, ':***@') : null,
};
const table: string[][] = [['scenario', 'backend', 'figure', 'value', 'reference']];
const row = (...cells: Array<string | number>) => table.push(cells.map(String));
const fmt = (x: number, digits = 1) => x.toFixed(digits);
// node --cpu-prof for a scenario's worker, when --profile-dir asks.
const profiled = (scenario: string): string[] =>
  values['profile-dir']
    ? ['--cpu-prof', `--cpu-prof-dir=${join(values['profile-dir'], scenario)}`]
    : [];

mkdirSync('bench/results', { recursive: true });
const file = `bench/results/bench-${(results.date as string).replace(/[:.]/g, '-')}.json`;
// Saved after every scenario, so a failure late in a long run loses nothing.
const save = () => writeFileSync(file, `${JSON.stringify({ results, table }, null, 2)}\n`);

const fake = await startFakeOpenAI();
const log = (text: string) => process.stderr.write(`bench: ${text}\n`);
// The test server shares the worker's two cores, and a real provider
// tokenizes on its own machines: count each text's tokens before any timing.
const prime = (messages: Iterable<SeedMessage>) =>
  fake.primeTokenCounts(Array.from(messages, (m) => m.content));

if (only.has('startup')) {
  try {
    await startupBench({ serverUrl, fakeUrl: fake.url, log, row, results });
  } catch (error) {
    results.startup_error = String(error);
    log(`startup failed: ${error}`);
  }
  save();
}

const corpusScenarios = ['overhead', 'latency', 'rate', 'fleet', 'memory', 'peer'];
for (const backend of corpusScenarios.some((name) => only.has(name)) ? backendList : []) {
  log(`seeding the corpus into ${backend}`);
  const template = await seedTemplate(backend, serverUrl, 1);
  prime(spamAssassin());
  try {
    const scenarios: Array<[string, boolean, () => Promise<void>]> = [
      ['overhead', true, () => overhead(backend, template)],
      ['latency', true, () => latency(backend, template)],
      ['rate', backend === backendList[0], () => rateBound(backend, template)],
      // Several processes on one database: a server's job (PGlite is one process's).
      ['fleet', backend === 'postgres', () => rateBound(backend, template, 3)],
      ['memory', true, () => memory(backend, template)],
      ['peer', backend === 'pglite', () => peer(template)],
    ];
    for (const [name, applies, scenario] of scenarios) {
      if (!only.has(name) || !applies) continue;
      try {
        await scenario();
      } catch (error) {
        results[`${name}_${backend}_error`] = String(error);
        log(`${backend}: ${name} failed: ${error}`);
      }
      save();
    }
  } finally {
    await template.drop();
  }
}
for (const backend of only.has('short') ? backendList : []) {
  try {
    await shortMessagesScenario(backend);
  } catch (error) {
    results[`short_${backend}_error`] = String(error);
    log(`${backend}: short failed: ${error}`);
  }
  save();
}
await fake.close();

if (only.has('sync')) {
  await syncBench({
    serverUrl,
    backends: backendList,
    parts: new Set(values['sync-parts'].split(',')),
    seconds: Number(values['sync-seconds']),
    rates: values['sync-rates'].split(',').map(Number),
    rerunMessages: Number(values['sync-messages']),
    staleReconcile: values['sync-stale-reconcile'] !== 'false',
    log,
    row,
    results,
    save,
  });
  save();
}

const widths = table[0]!.map((_, i) => Math.max(...table.map((r) => r[i]!.length)));
process.stdout.write(
  `${table.map((r) => r.map((c, i) => c.padEnd(widths[i]!)).join('  ')).join('\n')}\n\nwritten: ${file}\n`,
);

/** 1. Zero API latency: the worker's own cost, beside the bulk write path alone. */
async function overhead(backend: Backend, template: Template) {
  Object.assign(fake.options, { latencyMs: 0, maxTpm: undefined });
  const target = await template.copy();
  try {
    log(`${backend}: overhead, 6,000 messages, --batch-size 8`);
    const run = await runWorker(target.url, fake.url, [
      '--limit',
      '6000',
      '--batch-size',
      '8',
      '--concurrency',
      '4',
    ]);
    const write = await writeLimit(target.url, 6000);
    const ratio = run.messagesPerSecond / write.rowsPerSecond;
    results[`overhead_${backend}`] = {
      run_messages_per_s: run.messagesPerSecond,
      write_rows_per_s: write.rowsPerSecond,
      write_path: write.path,
      ratio,
    };
    row('1 overhead', backend, 'end-to-end messages/s', fmt(run.messagesPerSecond), '');
    row('1 overhead', backend, `write limit rows/s (${write.path})`, fmt(write.rowsPerSecond), '');
    row('1 overhead', backend, 'ratio end-to-end / write limit', fmt(ratio, 2), '');
  } finally {
    await target.drop();
  }
}

/**
 * 1b. Short chat-like messages, zero latency, the defaults: where pgembed
 * itself is the bottleneck. Against the same rows and vectors written by
 * the write path alone, and with each batch's commit latency.
 */
async function shortMessagesScenario(backend: Backend) {
  Object.assign(fake.options, { latencyMs: 0, maxTpm: undefined });
  const count = 20_000;
  log(`${backend}: short messages, seeding ${count.toLocaleString('en-US')}`);
  const template = await seedTemplate(backend, serverUrl, 0, shortMessages(count), 'short');
  prime(shortMessages(count));
  const target = await template.copy();
  try {
    log(`${backend}: short messages, defaults`);
    const run = await runWorker(target.url, fake.url, [], {
      nodeFlags: profiled(`short-${backend}`),
    });
    const commit = run.finished.commit as { p50_ms: number; p99_ms: number; max_ms: number };
    const write = await writeLimit(target.url, count, [64, 500]);
    const ratio = run.messagesPerSecond / write.rowsPerSecond;
    const alone = await providerAlone(shortMessages(count));
    const together = await providerAlone(shortMessages(count), target.url);
    results[`short_${backend}`] = {
      provider_alone: alone,
      provider_and_write_path: together,
      messages: count,
      run_messages_per_s: run.messagesPerSecond,
      worker_cpu_ms_per_message: run.cpuMsPerMessage,
      commit_ms: commit,
      peak_rss_mib: run.peakRssMiB,
      write_rows_per_s: write.rowsPerSecond,
      write_path: write.path,
      ratio,
    };
    row(
      '1b short',
      backend,
      `end-to-end messages/s (${count} messages)`,
      fmt(run.messagesPerSecond),
      '',
    );
    row(
      '1b short',
      backend,
      `write path alone rows/s (${write.path})`,
      fmt(write.rowsPerSecond),
      '',
    );
    row('1b short', backend, 'ratio end-to-end / write path', fmt(ratio, 2), 'goal >= 0.5');
    row(
      '1b short',
      backend,
      'provider path alone messages/s (the SDK, no database)',
      fmt(alone.messages_per_s),
      `ratio ${fmt(alone.messages_per_s / write.rowsPerSecond, 2)} of the write path; client CPU ${fmt(alone.cpu_ms / count, 3)} ms a message`,
    );
    row(
      '1b short',
      backend,
      'read, provider and write paths together messages/s (no claims, scan or fence)',
      fmt(together.messages_per_s),
      `ratio ${fmt(together.messages_per_s / write.rowsPerSecond, 2)} of the write path; the run reached ${fmt(run.messagesPerSecond / together.messages_per_s, 2)} of it; CPU ${fmt(together.cpu_ms / count, 3)} ms a message`,
    );
    row(
      '1b short',
      backend,
      'worker CPU per message, all its threads',
      `${fmt(run.cpuMsPerMessage, 3)} ms`,
      'steadier than the pace on shared cores',
    );
    row(
      '1b short',
      backend,
      'commit per batch p50 / p99 / max',
      `${commit.p50_ms} / ${commit.p99_ms} / ${commit.max_ms} ms`,
      '',
    );
    if (backend === 'pglite') await singleThreadedGc(template, count);
  } finally {
    await target.drop();
    await template.drop();
  }
}

/**
 * The same run under `node --single-threaded-gc`: on PGlite the worker's two
 * busy threads, V8's collector threads and the test server share two
 * cores, and the collectors' concurrent work took ~0.2 ms of CPU a message
 * (BENCHMARKS.md, "sixth pass"). A flag for the operator, not a default.
 */
async function singleThreadedGc(template: Template, count: number) {
  const target = await template.copy();
  try {
    log('pglite: short messages, node --single-threaded-gc');
    const run = await runWorker(target.url, fake.url, [], { nodeFlags: ['--single-threaded-gc'] });
    (results.short_pglite as Record<string, unknown>).single_threaded_gc = {
      run_messages_per_s: run.messagesPerSecond,
      worker_cpu_ms_per_message: run.cpuMsPerMessage,
      peak_rss_mib: run.peakRssMiB,
    };
    row(
      '1b short',
      'pglite',
      `end-to-end messages/s, node --single-threaded-gc (${count} messages)`,
      fmt(run.messagesPerSecond),
      `worker CPU ${fmt(run.cpuMsPerMessage, 3)} ms a message`,
    );
  } finally {
    await target.drop();
  }
}

/**
 * The same texts sent through pgembed's own client (the real SDK, vectors
 * decoded), as the run sends them (64 a request, 4 at a time), with no
 * database: a ceiling for the run, beside the write path alone. With
 * `databaseUrl`, the texts are read from its messages by keyset and the
 * vectors written back by the write path, 500 rows a transaction: reading,
 * sending and writing on the same cores, nothing of a run's coordination. In
 * a child process, as the worker is, against the same test server in this one.
 */
async function providerAlone(messages: Iterable<SeedMessage>, databaseUrl?: string) {
  const dir = mkdtempSync(join(tmpdir(), 'pgembed-bench-texts-'));
  try {
    const file = join(dir, 'texts.json');
    writeFileSync(file, JSON.stringify(Array.from(messages, (m) => m.content)));
    const { stdout } = await promisify(execFile)(
      process.execPath,
      [new URL('./provider-alone.mjs', import.meta.url).pathname],
      {
        env: {
          ...process.env,
          PGEMBED_TEXTS_FILE: file,
          PGEMBED_BASE_URL: fake.url,
          PGEMBED_BATCH: '64',
          PGEMBED_CONCURRENCY: '4',
          ...(databaseUrl ? { PGEMBED_DATABASE_URL: databaseUrl } : {}),
        },
      },
    );
    return JSON.parse(stdout) as { messages_per_s: number; cpu_ms: number; elapsed_ms: number };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/** The same number of 1,536-dimension vectors, written by the fastest bulk path alone. */
async function writeLimit(url: string, rows: number, perTransaction = [8, 500]) {
  const database = await openDatabase(url);
  try {
    const writer = database.embeddingWriter(await readEmbeddingColumnType(database.db), 'bigint');
    const vectors = Array.from({ length: rows }, (_, i) => fakeEmbedding(`row ${i}`, 1536));
    let best = { rowsPerSecond: 0, path: '' };
    for (const per of perTransaction) {
      const provider = `bench-write-${per}`;
      const start = performance.now();
      for (let i = 0; i < rows; i += per) {
        const batch = vectors.slice(i, i + per).map((vector, k) => ({
          messageId: String(i + k + 1),
          vector,
          sha256Hex: '00'.repeat(32),
          inputTokens: 1,
          truncated: false,
        }));
        const target = { provider, model: 'm', runId: '0' };
        await database.db.transaction().execute(async (trx) => {
          await writer.upsert(trx, target, batch);
        });
      }
      const rowsPerSecond = rows / ((performance.now() - start) / 1000);
      const path = `${writer.method}, ${per} rows per transaction`;
      if (rowsPerSecond > best.rowsPerSecond) best = { rowsPerSecond, path };
    }
    return best;
  } finally {
    await database.close();
  }
}

/** 2. 200 ms per request: messages/s against concurrency × batch / latency. */
async function latency(backend: Backend, template: Template) {
  Object.assign(fake.options, { latencyMs: 200, maxTpm: undefined });
  const rows: unknown[] = [];
  for (const concurrency of values['latency-concurrency'].split(',').map(Number)) {
    const limit = Math.min(6000, Math.max(400, concurrency * 8 * 30));
    const target = await template.copy();
    try {
      log(`${backend}: latency 200 ms, --concurrency ${concurrency}, ${limit} messages`);
      const slots = slotProfile(fake, concurrency);
      const run = await runWorker(
        target.url,
        fake.url,
        ['--limit', String(limit), '--batch-size', '8', '--concurrency', String(concurrency)],
        { nodeFlags: profiled(`latency-${concurrency}-${backend}`) },
      );
      const busy = slots.stop();
      const ideal = (concurrency * 8) / 0.2;
      const share = run.messagesPerSecond / ideal;
      const timeline = await commitTimeline(target.url);
      const steadyShare = timeline.steadyMessagesPerSecond / ideal;
      rows.push({
        concurrency,
        messages: limit,
        messages_per_s: run.messagesPerSecond,
        ideal,
        share,
        first_commit_ms: timeline.firstCommitMs,
        steady_messages_per_s: timeline.steadyMessagesPerSecond,
        steady_share: steadyShare,
        request_ms_avg: timeline.requestMsAvg,
        worker_cpu_ms_per_message: run.cpuMsPerMessage,
        slots: busy,
      });
      row(
        '2 latency 200 ms',
        backend,
        `--concurrency ${concurrency}`,
        fmt(run.messagesPerSecond),
        `ideal ${fmt(ideal, 0)} (${fmt(100 * share, 0)}%)`,
      );
      row(
        '2 latency 200 ms',
        backend,
        `  first commit; then, until the last`,
        `${fmt(timeline.firstCommitMs, 0)} ms; ${fmt(timeline.steadyMessagesPerSecond)}/s`,
        `${fmt(100 * steadyShare, 0)}% of ideal; requests ${fmt(timeline.requestMsAvg, 0)} ms`,
      );
      const pct = (share: number | null) => (share === null ? 'never' : `${fmt(100 * share, 0)}%`);
      row(
        '2 latency 200 ms',
        backend,
        '  provider slots busy: until 90% of them; then; overall',
        `${busy.rampMs === null ? 'never' : `${fmt(busy.rampMs, 0)} ms`}; ${pct(busy.steadyShare)}`,
        `${pct(busy.overallShare)} from the first request to the last answer`,
      );
      row(
        '2 latency 200 ms',
        backend,
        '  worker CPU per message, all its threads',
        `${fmt(run.cpuMsPerMessage, 3)} ms`,
        '',
      );
    } finally {
      await target.drop();
    }
  }
  results[`latency_${backend}`] = rows;
  fake.options.latencyMs = 0;
}

/** 3. A server limit of N tokens a minute: achieved share of N, and of requests refused. */
/**
 * 3. Rate-bound: the server and each worker at the same --max-tpm. With
 * `workers` > 1 (3b, the fleet), that many workers share one API key and so
 * one budget (src/worker/fleet-gate.ts): together they should get the limit.
 */
async function rateBound(backend: Backend, template: Template, workers = 1) {
  const tpm = Number(values['rate-tpm']);
  const seconds = Number(values['rate-seconds']);
  Object.assign(fake.options, { latencyMs: 50, maxTpm: tpm, maxTpmBurst: undefined });
  fake.reset();
  const target = await template.copy();
  try {
    log(`${backend}: rate-bound, server and --max-tpm ${tpm}, ${workers} worker(s), ${seconds} s`);
    const samples: Array<{ t: number; tokens: number }> = [];
    const sampler = setInterval(
      () => samples.push({ t: Date.now(), tokens: fake.stats.tokensEmbedded }),
      1000,
    );
    const started = Date.now();
    await Promise.all(
      Array.from({ length: workers }, () =>
        runWorker(
          target.url,
          fake.url,
          ['--batch-size', '8', '--concurrency', '8', '--max-tpm', String(tpm)],
          { stopAfterMs: seconds * 1000 },
        ),
      ),
    );
    clearInterval(sampler);
    const at = (s: number) =>
      samples.find((x) => x.t - started >= s * 1000)?.tokens ?? fake.stats.tokensEmbedded;
    const total = at(seconds);
    const steady = (at(seconds) - at(15)) / ((seconds - 15) / 60);
    const share = total / (seconds / 60) / tpm;
    const refused = fake.stats.rateLimited / Math.max(fake.stats.requests, 1);
    results[workers > 1 ? 'fleet' : 'rate'] = {
      backend,
      workers,
      tpm,
      seconds,
      tokens: total,
      share_of_limit: share,
      steady_share_after_15s: steady / tpm,
      requests: fake.stats.requests,
      rate_limited: fake.stats.rateLimited,
      refused_share: refused,
    };
    const scenario = workers > 1 ? `3b fleet of ${workers}` : '3 rate-bound';
    row(
      scenario,
      backend,
      `tokens/min over ${seconds} s`,
      fmt(total / (seconds / 60), 0),
      `${fmt(100 * share, 1)}% of ${tpm} (target >= 95%)`,
    );
    row(
      scenario,
      backend,
      'tokens/min after the first 15 s',
      fmt(steady, 0),
      `${fmt((100 * steady) / tpm, 1)}% of ${tpm}`,
    );
    row(
      scenario,
      backend,
      'requests answered 429',
      `${fake.stats.rateLimited}/${fake.stats.requests}`,
      `${fmt(100 * refused, 2)}% (target <= 1%)`,
    );
  } finally {
    Object.assign(fake.options, { latencyMs: 0, maxTpm: undefined });
    await target.drop();
  }
}

/** 5. Peak RSS of the worker at the corpus and ten times the corpus: flat, not growing. */
async function memory(backend: Backend, template: Template) {
  Object.assign(fake.options, { latencyMs: 0, maxTpm: undefined });
  const out: Record<string, unknown> = {};
  for (const [times, limit] of [
    [1, 6046],
    [10, 60_000],
  ] as const) {
    const big = times === 1 ? template : await seedTemplate(backend, serverUrl, times);
    const target = await big.copy();
    try {
      log(`${backend}: memory, ${limit} messages`);
      const run = await runWorker(target.url, fake.url, [
        '--limit',
        String(limit),
        '--batch-size',
        '64',
        '--concurrency',
        '4',
      ]);
      out[String(limit)] = { peak_rss_mib: run.peakRssMiB, messages_per_s: run.messagesPerSecond };
      row(
        '5 memory',
        backend,
        `peak RSS at ${limit.toLocaleString('en-US')} messages`,
        `${run.peakRssMiB} MiB`,
        `${fmt(run.messagesPerSecond)} messages/s`,
      );
    } finally {
      await target.drop();
      if (big !== template) await big.drop();
    }
  }
  results[`memory_${backend}`] = out;
}

/** 4. LangChain.js's indexing API on the same corpus and server, beside pgembed. */
/**
 * 4. LangChain's index() and pgembed through the same one-connection socket:
 * at zero latency, where that one PGlite session binds both, and at 200 ms,
 * as a hosted provider answers, where it does not. LangChain sends each
 * 100-document chunk of index() at once (13 requests of 8); pgembed is given
 * --concurrency 16 there.
 */
async function peer(template: Template) {
  const runs: Array<[number, string[]]> = [
    [0, []],
    [200, ['--concurrency', '16']],
  ];
  for (const [latencyMs, args] of runs) {
    Object.assign(fake.options, { latencyMs, maxTpm: undefined });
    const outcome = await runPeer(template, fake.url, log, args);
    results[`peer_${latencyMs}ms`] = outcome;
    const where = `pglite-socket, ${latencyMs} ms`;
    if ('skipped' in outcome) {
      row('4 peer', where, 'LangChain index()', 'not run', String(outcome.skipped));
      return;
    }
    row(
      '4 peer',
      where,
      `LangChain index(), ${outcome.messages} messages`,
      fmt(outcome.langchain_messages_per_s),
      '',
    );
    row(
      '4 peer',
      where,
      `pgembed${args.length ? ` ${args.join(' ')}` : ''}, same messages`,
      fmt(outcome.pgembed_messages_per_s),
      `${fmt(outcome.ratio, 2)}x LangChain (goal >= 3)`,
    );
    const cores = (n: number | null) => (n === null ? 'n/a' : fmt(n, 2));
    row(
      '4 peer',
      where,
      '  socket server CPU, cores: LangChain / pgembed',
      `${cores(outcome.server_cores.langchain)} / ${cores(outcome.server_cores.pgembed)}`,
      'near 1: the one PGlite session binds the run',
    );
  }
  fake.options.latencyMs = 0;
}
