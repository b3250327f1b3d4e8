import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { createLogger } from '../src/log.js';
import {
  forgetSecrets,
  redactSecrets,
  redactUrl,
  redactValues,
  rememberSecrets,
  secretsOfSettings,
} from '../src/redact.js';
import { finishRun, insertRun } from '../src/sql/runs.js';
import { type RunSummary, writeManifest } from '../src/worker/summary.js';
import { openMigrated } from './support/db.js';

afterEach(() => forgetSecrets());

describe('redactUrl', () => {
  it.each<[url: string, redacted: string]>([
    // All of the user-info, user name included.
    ['https://user:pass@proxy.example/v1', 'https://***@proxy.example/v1'],
    ['https://token-only@proxy.example/v1', 'https://***@proxy.example/v1'],
    ['postgres://me:s3cret@db:5432/app', 'postgres://***@db:5432/app'],
    // Every query value, keeping the keys; the fragment.
    [
      'https://proxy.example/v1?api-key=abc123&x=1&flag&empty=',
      'https://proxy.example/v1?api-key=***&x=***&***&empty=',
    ],
    ['https://proxy.example/v1#frag-secret', 'https://proxy.example/v1#***'],
    [
      'postgres://u:pw@127.0.0.1:1/x?password=p2&sslpassword=p3',
      'postgres://***@127.0.0.1:1/x?password=***&sslpassword=***',
    ],
    // An '@' in an unencoded password: the user-info ends at the last one.
    ['postgres://u:p@ss@host/db', 'postgres://***@host/db'],
    // A URL that `new URL` refuses (port out of range) is redacted all the same.
    ['http://u:pw@127.0.0.1:99999/v1?k=v', 'http://***@127.0.0.1:99999/v1?k=***'],
    // Nothing secret: unchanged.
    ['http://127.0.0.1:8787/v1', 'http://127.0.0.1:8787/v1'],
    ['pglite:./.data/pglite', 'pglite:./.data/pglite'],
    ['not a url', 'not a url'],
  ])('%s → %s', (url, redacted) => {
    expect(redactUrl(url)).toBe(redacted);
    expect(redactUrl(redacted)).toBe(redacted);
  });
});

describe('redactSecrets', () => {
  it('redacts every URL in a message, leaving the sentence around it', () => {
    const text =
      "cannot reach http://us3r:pa55@h:1/v1?api-key=k3y. Try (postgres://a:b@db/x?password=pw2), then 'https://p.example/v1#f'";
    expect(redactSecrets(text, [])).toBe(
      "cannot reach http://***@h:1/v1?api-key=***. Try (postgres://***@db/x?password=***), then 'https://p.example/v1#***'",
    );
  });

  it('redacts the URL fetch quotes when it refuses one with credentials', () => {
    const text =
      'connection error: Request cannot be constructed from a URL that includes credentials: http://s3cr3t-user:s3cr3t-pass@127.0.0.1:9/v1/embeddings';
    expect(redactSecrets(text, [])).toBe(
      'connection error: Request cannot be constructed from a URL that includes credentials: http://***@127.0.0.1:9/v1/embeddings',
    );
  });

  it('redacts query values of a URL quoted without its scheme, as a server echoes a request', () => {
    expect(
      redactSecrets('404 Invalid URL (POST /v1?api-key=s3cr3t-query%2Fembeddings&b=c)', []),
    ).toBe('404 Invalid URL (POST /v1?api-key=***&b=***)');
  });

  it('redacts password=… pairs of a libpq connection string', () => {
    expect(redactSecrets('host=db user=me password=hunter22 dbname=app', [])).toBe(
      'host=db user=me password=*** dbname=app',
    );
  });

  it('replaces known secrets wherever they appear, percent-encoded too', () => {
    const secrets = [
      'sk-s3cr3t-key',
      'postgres://me:p%40ssw0rd!@db/app?password=qu3ry-s3cr3t&sslmode=require',
    ];
    const text =
      'key sk-s3cr3t-key; the server said "password p@ssw0rd! rejected"; echo qu3ry-s3cr3t; p%40ssw0rd!; sslmode require';
    expect(redactSecrets(text, secrets)).toBe(
      'key ***; the server said "password *** rejected"; echo ***; ***; sslmode require',
    );
  });

  it('replaces a known base URL whole by its redacted form, even where it is not a clean URL', () => {
    const base = "https://u:it's-s3cr3t@proxy.example/v1";
    expect(redactSecrets(`OPENAI_BASE_URL is not a URL: '${base}'`, [base])).toBe(
      "OPENAI_BASE_URL is not a URL: 'https://***@proxy.example/v1'",
    );
  });

  it('does not hunt for short known values verbatim (they would mangle words), but still in URLs', () => {
    expect(redactSecrets('none of it; http://u:none@h/', ['none'])).toBe(
      'none of it; http://***@h/',
    );
  });

  it('uses the remembered secrets by default', () => {
    expect(redactSecrets('key sk-remembered-1')).toBe('key sk-remembered-1');
    rememberSecrets(['sk-remembered-1']);
    expect(redactSecrets('key sk-remembered-1')).toBe('key ***');
  });

  it('keeps a JSON line valid when a secret has characters JSON escapes', () => {
    const secret = 'p"w\\s3cr3t';
    const line = `${JSON.stringify({ msg: `said ${secret}`, url: 'https://a:b@h/?k=v' })}\n`;
    const redacted = redactSecrets(line, [secret], { json: true });
    expect(JSON.parse(redacted)).toEqual({ msg: 'said ***', url: 'https://***@h/?k=***' });
  });

  it('redactValues redacts every string of a nested value and leaves the rest', () => {
    expect(
      redactValues({ a: 'x http://u:p@h/ y', b: [1, 'sk-s3cr3t-key'], c: null, d: true }, [
        'sk-s3cr3t-key',
      ]),
    ).toEqual({ a: 'x http://***@h/ y', b: [1, '***'], c: null, d: true });
  });

  it("finds the settings' secrets in the environment and among the arguments", () => {
    expect(
      secretsOfSettings(
        {
          OPENAI_API_KEY: 'sk-1',
          OPENAI_BASE_URL: 'http://b',
          DATABASE_URL: 'postgres://d',
          PGPASSWORD: 'pw',
          HOME: '/root',
        },
        ['--limit', '5', '--base-url=https://u:p@flag.example/v1?k=v'],
      ).sort(),
    ).toEqual(['sk-1', 'pw', 'http://b', 'postgres://d', 'https://u:p@flag.example/v1?k=v'].sort());
  });

  it('takes an embedded database path for no secret: lines about it show it as it is', () => {
    const secrets = secretsOfSettings({ DATABASE_URL: 'pglite:/tmp/pgembed-data' }, []);
    expect(secrets).toEqual([]);
    expect(redactSecrets('opened pglite:/tmp/pgembed-data', secrets)).toBe(
      'opened pglite:/tmp/pgembed-data',
    );
  });
});

describe('the sinks', () => {
  const base = 'http://us3r:s3cr3t-pass@127.0.0.1:9/v1?api-key=s3cr3t-query#s3cr3t-frag';

  it('the log: URLs in any field and known secrets are redacted, and each line stays JSON', () => {
    rememberSecrets(['sk-s3cr3t-key']);
    const lines: string[] = [];
    const destination = new Writable({
      write(chunk, _encoding, done) {
        lines.push(String(chunk));
        done();
      },
    });
    const logger = createLogger('debug', { pretty: false, destination });
    logger.info(
      { base_url: base, database: 'postgres://u:dbs3cr3t@h/x?password=dbs3cr3t2' },
      'start',
    );
    logger.warn({ err: new Error(`fetch failed for ${base}`) }, 'the key was sk-s3cr3t-key');
    expect(lines).toHaveLength(2);
    expect(lines.join('')).not.toMatch(/s3cr3t|us3r/);
    const [start, warn] = lines.map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(start).toMatchObject({
      base_url: 'http://***@127.0.0.1:9/v1?api-key=***#***',
      database: 'postgres://***@h/x?password=***',
    });
    expect(warn).toMatchObject({ msg: 'the key was ***' });
  });

  describe('the run row and the manifest', () => {
    let scratch: string;
    beforeAll(() => {
      scratch = mkdtempSync(join(tmpdir(), 'pgembed-redact-'));
    });
    afterAll(() => rmSync(scratch, { recursive: true, force: true }));

    // A cast, not a full literal: the summary's other fields do not matter here.
    const summary = (error: string) =>
      ({
        runId: '1',
        status: 'failed',
        provider: 'openai',
        model: 'm',
        planned: 0,
        embedded: 0,
        skipped: 0,
        truncated: 0,
        tokens: 0,
        requests: 0,
        retries: 0,
        batches: 0,
        ineligible: { blank: 0, upToDate: 0 },
        skippedByReason: {},
        elapsedMs: 1,
        messagesPerSecond: 0,
        peakRssMiB: 1,
        error,
      }) as RunSummary;

    it('embedding_runs keeps no URL secret in options, error or summary', async () => {
      rememberSecrets(['sk-s3cr3t-key']);
      const database = await openMigrated(`pglite:${join(scratch, 'db')}`);
      try {
        const runId = await insertRun(database.db, {
          provider: 'openai',
          model: 'm',
          options: { base_url: base },
          planned: 0,
          blank: 0,
          watch: false,
        });
        const error = `connection error: ${base} refused the key sk-s3cr3t-key`;
        await finishRun(database.db, runId, 'failed', { ...summary(error) }, error);
        const row = await database.db
          .selectFrom('embedding_runs')
          .select(['options', 'error', 'summary'])
          .where('id', '=', runId)
          .executeTakeFirstOrThrow();
        expect(JSON.stringify(row)).not.toMatch(/s3cr3t|us3r/);
        expect(row.error).toBe(
          'connection error: http://***@127.0.0.1:9/v1?api-key=***#*** refused the key ***',
        );
        expect(row.options).toMatchObject({
          base_url: 'http://***@127.0.0.1:9/v1?api-key=***#***',
        });
      } finally {
        await database.close();
      }
    });

    it('the manifest keeps no URL secret', async () => {
      const file = join(scratch, 'manifest.json');
      await writeManifest(file, summary(`HTTP 404: POST /v1?api-key=s3cr3t-query at ${base}`), {
        rejected_input: ['7'],
      });
      const text = readFileSync(file, 'utf8');
      expect(text).not.toMatch(/s3cr3t|us3r/);
      expect(JSON.parse(text)).toMatchObject({
        error: 'HTTP 404: POST /v1?api-key=*** at http://***@127.0.0.1:9/v1?api-key=***#***',
        skippedIds: { rejected_input: ['7'] },
      });
    });
  });
});

/** A JSON logger writing into `lines`, as the CLI's log does. */
function captureLog(): { lines: string[]; logger: ReturnType<typeof createLogger> } {
  const lines: string[] = [];
  const destination = new Writable({
    write(chunk, _encoding, done) {
      lines.push(String(chunk));
      done();
    },
  });
  return { lines, logger: createLogger('debug', { pretty: false, destination }) };
}

/** Remembers the settings' secrets as runCli does. */
function rememberSettings(env: NodeJS.ProcessEnv): void {
  rememberSecrets(secretsOfSettings(env, []));
}

describe('what is not a secret stays readable', () => {
  it('a password equal to the product, user and database name (docker-compose) is redacted only inside URLs', () => {
    const url = 'postgres://pgembed:pgembed@db:5432/pgembed';
    rememberSettings({ DATABASE_URL: url, OPENAI_API_KEY: 'sk-s3cr3t-key' });
    expect(redactSecrets('pgembed: seeded 10 messages from messages.jsonl\n')).toBe(
      'pgembed: seeded 10 messages from messages.jsonl\n',
    );
    expect(redactSecrets(`pgembed: cannot connect to ${url}`)).toBe(
      'pgembed: cannot connect to postgres://***@db:5432/pgembed',
    );
    const { lines, logger } = captureLog();
    logger.info({ name: 'pgembed', database: url, key: 'sk-s3cr3t-key' }, 'pgembed starting');
    const line = JSON.parse(lines[0] as string) as Record<string, unknown>;
    expect(line).toMatchObject({
      name: 'pgembed',
      msg: 'pgembed starting',
      database: 'postgres://***@db:5432/pgembed',
      key: '***',
    });
  });

  it('a password equal to the user name (postgres:postgres) does not mangle commands or package names', () => {
    const url = 'postgresql://postgres:postgres@127.0.0.1:5432/postgres';
    rememberSettings({ DATABASE_URL: url });
    const text =
      'psql -h /tmp/pgembed-x -p 5432 -U postgres postgres\napt-get install postgresql-17-pgvector\n';
    expect(redactSecrets(text)).toBe(text);
    expect(redactSecrets(`at ${url}`)).toBe('at postgresql://***@127.0.0.1:5432/postgres');
  });

  it('PGPASSWORD equal to the user or database name is not hunted either', () => {
    rememberSettings({
      DATABASE_URL: 'postgres://127.0.0.1:5432/app',
      PGUSER: 'appadmin',
      PGPASSWORD: 'appadmin',
    });
    expect(redactSecrets('psql -U appadmin app')).toBe('psql -U appadmin app');
  });

  it('an all-digit password leaves numbers alone, and every log line stays JSON', () => {
    rememberSettings({ DATABASE_URL: 'postgres://app:12345678@db/app' });
    expect(redactSecrets('embedded 10 messages, 123456789 tokens')).toBe(
      'embedded 10 messages, 123456789 tokens',
    );
    const { lines, logger } = captureLog();
    logger.info({ tokens: 123456789, requests: 12345678 }, 'run finished');
    expect(JSON.parse(lines[0] as string)).toMatchObject({
      tokens: 123456789,
      requests: 12345678,
    });
  });

  it('the log replaces a known secret only inside string values, never in numbers or keys', () => {
    // An API key is hunted verbatim whatever it looks like, even all digits.
    rememberSettings({ OPENAI_API_KEY: '9876543210' });
    const { lines, logger } = captureLog();
    logger.info({ tokens: 98765432101, 9876543210: 'x', said: 'key 9876543210' }, 'done');
    const line = JSON.parse(lines[0] as string) as Record<string, unknown>;
    expect(line).toMatchObject({ tokens: 98765432101, 9876543210: 'x', said: 'key ***' });
  });

  it("an Azure base URL's api-version is redacted inside the URL, not hunted through the text", () => {
    const base = 'https://x.openai.azure.com/openai?api-version=2024-02-01';
    rememberSettings({ OPENAI_BASE_URL: base, OPENAI_API_KEY: 'sk-s3cr3t-key' });
    expect(redactSecrets('run 3 started 2024-02-01 12:00, finished 2024-02-01 12:05')).toBe(
      'run 3 started 2024-02-01 12:00, finished 2024-02-01 12:05',
    );
    expect(redactSecrets(`cannot reach ${base}`)).toBe(
      'cannot reach https://x.openai.azure.com/openai?api-version=***',
    );
    const { lines, logger } = captureLog();
    logger.info({ base_url: base, day: '2024-02-01' }, 'started');
    expect(JSON.parse(lines[0] as string)).toMatchObject({
      base_url: 'https://x.openai.azure.com/openai?api-version=***',
      day: '2024-02-01',
    });
  });
});

describe('what is a secret is still hunted', () => {
  it('a long, specific password is hunted verbatim in free text', () => {
    rememberSettings({ DATABASE_URL: 'postgres://pgembed:c0rrect-h0rse@db:5432/pgembed' });
    expect(redactSecrets('the server said c0rrect-h0rse is wrong')).toBe(
      'the server said *** is wrong',
    );
  });

  it('PGPASSWORD long and specific enough is hunted verbatim', () => {
    rememberSettings({ DATABASE_URL: 'postgres://app@db/app', PGPASSWORD: 'b4ttery-st4ple' });
    expect(redactSecrets('echo b4ttery-st4ple')).toBe('echo ***');
  });

  it('query values under keys that sound secret are hunted verbatim; others only inside URLs', () => {
    const base =
      'https://x.openai.azure.com/openai?api-version=2024-02-01&api-key=az-s3cr3t-key&sig=s1gn4ture-v4lue';
    rememberSettings({ OPENAI_BASE_URL: base });
    expect(redactSecrets('key az-s3cr3t-key, sig s1gn4ture-v4lue, day 2024-02-01')).toBe(
      'key ***, sig ***, day 2024-02-01',
    );
  });

  it('a password is not hunted when it is short, all digits or a word of its URL, but always redacted in it', () => {
    for (const url of [
      'postgres://app:s3cr3t@db/app',
      'postgres://app:87654321@db/app',
      'postgres://app:database@database/app',
      'postgres://app:warehouse@db/warehouse',
    ]) {
      forgetSecrets();
      rememberSettings({ DATABASE_URL: url });
      const password = decodeURIComponent(new URL(url).password);
      expect(redactSecrets(`said ${password}`), url).toBe(`said ${password}`);
      expect(redactSecrets(`at ${url}`), url).toMatch(/^at postgres:\/\/\*\*\*@/);
    }
  });
});
